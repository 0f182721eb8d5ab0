"""The command line's input side: every bad input stops within seconds, before any model loads, with one
line naming it (exit 2); runs are never silently replaced; `--resume` continues with the saved config."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdpo_fast.cli import UsageError, parse
from sdpo_fast.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def sdpo_fast(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sdpo_fast.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)
    return done, time.perf_counter() - start


BAD_INPUTS = {  # name: (YAML file content or None, flags, words the message must contain)
    "yaml literal": ("algorithm: gpro\n", [], ["algorithm", "'grpo'", "'gpro'"]),
    "yaml rollout": ("rollout: vlm\n", [], ["rollout", "'vllm'", "'vlm'"]),
    "yaml teacher": ("teacher: mean\n", [], ["teacher", "'ema'", "'mean'"]),
    "yaml type": ('max_steps: "three"\n', [], ["max_steps", "integer", "'three'"]),
    "yaml syntax": ("model: [\n", [], ["bad.yaml", "line 2", "invalid YAML"]),
    "yaml unknown key": ("optim: {learning_rate: 1}\n", [], ["optim.learning_rate"]),
    "grpo one rollout": ("algorithm: grpo\nrollouts_per_prompt: 1\n", [], ["rollouts_per_prompt >= 2"]),
    "flag value": (None, ["--algorithm", "grpo", "--rollouts-per-prompt", "1"], ["rollouts_per_prompt >= 2"]),
    "nested flag value": (None, ["--loss.kl-coef", "-1"], ["kl_coef must be a number"]),
    "flag type": (None, ["--max-steps", "three"], ["--max-steps", "'three'"]),
    "nested flag type": (None, ["--loss.alpha", "half"], ["--loss.alpha", "'half'"]),
    "task option type": (None, ["--task-options", "digits", "abc"], ["task_options", "digits"]),
    "task option name": (None, ["--task-options", "colour", "red"], ["task_options", "colour"]),
    "task": (None, ["--task", "chess"], ["task must be one of", "'chess'"]),
    "model name": (None, ["--model", "smollm2-135x"], ["model 'smollm2-135x'", "never downloaded"]),
    "model path": (None, ["--model", "no/such/dir"], ["model 'no/such/dir'"]),
    "resume without checkpoint": (None, ["--resume"], ["--resume", "no checkpoint"]),
    "output dir is a file": (None, ["--output-dir", "afile"], ["output_dir afile is a file"]),
    "output dir holds a run": (None, ["--output-dir", "oldrun"], ["--resume", "--overwrite"]),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_stops_at_once_with_one_line(tmp_path, name):
    text, flags, words = BAD_INPUTS[name]
    (tmp_path / "afile").write_text("not a directory")
    (tmp_path / "oldrun").mkdir()
    (tmp_path / "oldrun" / "metrics.jsonl").write_text('{"step": 1}\n')
    args = ["train", "--model", "tiny-random", "--output-dir", "new", *flags]
    if text is not None:
        (tmp_path / "bad.yaml").write_text(text)
        args += ["--config", "bad.yaml"]
    done, seconds = sdpo_fast(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdpo-fast train: error: "), done.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert seconds < 5, seconds  # no model, no torch: well under a second on an idle machine


def test_top_level_help_and_unknown_command(tmp_path):
    done, _ = sdpo_fast("--help", cwd=tmp_path)
    assert done.returncode == 0
    for command in ("train", "eval", "ttsd", "ttsd-experiment", "bench"):
        assert any(line.split()[:1] == [command] and len(line.split()) > 2 for line in done.stdout.splitlines())
    done, _ = sdpo_fast("trian", cwd=tmp_path)
    assert done.returncode == 2 and "unknown command 'trian'" in done.stderr


def test_every_option_has_help_and_config_is_documented(tmp_path):
    for command in ("train", "eval"):
        done, _ = sdpo_fast(command, "--help", cwd=tmp_path)
        assert done.returncode == 0 and "--config FILE" in done.stdout
        assert "--task-options KEY VALUE" in done.stdout
    done, _ = sdpo_fast("train", "--help", cwd=tmp_path)
    assert "no-dont" not in done.stdout and "--reprompt.self-demonstration" in done.stdout
    for command in ("train", "eval"):  # an option without help text would show only "(default: ...)"
        done, _ = sdpo_fast(command, "--help", cwd=tmp_path)
        lines = [line.strip("│ ").rstrip() for line in done.stdout.splitlines()]
        options = [i for i, line in enumerate(lines) if line.startswith("--") and not line.startswith("--help")]
        assert len(options) > (40 if command == "train" else 8)
        for i in options:
            inline = "   " in lines[i]  # short help shares the option's line
            assert inline or not lines[i + 1].startswith("(default"), f"{command} {lines[i]} has no help text"


def test_demo_config_task_options_stay_overridable():
    demo = str(ROOT / "configs" / "demo.yaml")
    assert parse(TrainConfig, ["--config", demo], prog="t").task_options == {"digits": "1"}
    cfg = parse(TrainConfig, ["--config", demo, "--task-options", "digits", "2", "ops", "+"], prog="t")
    assert cfg.task_options == {"digits": "2", "ops": "+"} and cfg.algorithm == "blend"


def test_flags_and_yaml_get_the_same_checks(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss: {alpha: 2}\n")
    with pytest.raises(UsageError, match="loss.alpha must be a number in"):
        parse(TrainConfig, ["--config", str(path)], prog="t")
    with pytest.raises(UsageError, match="alpha must be a number in"):
        parse(TrainConfig, ["--loss.alpha", "2"], prog="t")
    with pytest.raises(UsageError, match="rollouts_per_prompt >= 2"):
        parse(TrainConfig, ["--algorithm", "blend", "--rollouts-per-prompt", "1"], prog="t")
    with pytest.raises(SystemExit) as info:  # tyro reports unknown flags and invalid choices itself (exit 2)
        parse(TrainConfig, ["--algorithm", "gpro"], prog="t")
    assert info.value.code == 2


TINY = ["--model", "tiny-random", "--prompts-per-step", "2", "--rollouts-per-prompt", "2", "--micro-batch-size",
        "4", "--sampling.max-new-tokens", "4", "--eval.problems", "2", "--env-workers", "1", "--no-export"]


def test_runs_are_never_silently_replaced_and_resume_restores_the_saved_config(tmp_path):
    from sdpo_fast.train.metrics import read_metrics
    from sdpo_fast.train.trainer import Trainer

    out = tmp_path / "run"
    cfg = parse(TrainConfig, [*TINY, "--output-dir", str(out), "--max-steps", "1", "--optim.lr", "3e-4",
                              "--algorithm", "grpo"], prog="t")
    Trainer(cfg).fit()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1]

    again = parse(TrainConfig, [*TINY, "--output-dir", str(out), "--max-steps", "1"], prog="t")
    with pytest.raises(ValueError, match="--resume.*--overwrite"):
        Trainer(again).fit()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1]  # untouched

    resumed = parse(TrainConfig, ["--output-dir", str(out), "--resume", "--max-steps", "2"], prog="t")
    assert (resumed.model, resumed.algorithm, resumed.optim.lr, resumed.max_steps) == ("tiny-random", "grpo", 3e-4, 2)
    Trainer(resumed).fit()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1, 2]
    changes = [json.loads(line) for line in (out / "config_changes.jsonl").read_text().splitlines()]
    assert changes == [{"step": 1, "changed": {"max_steps": [1, 2]}}]
    assert "max_steps: 2" in (out / "config.yaml").read_text()

    fresh = parse(TrainConfig, [*TINY, "--output-dir", str(out), "--max-steps", "1", "--overwrite"], prog="t")
    Trainer(fresh).fit()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1]
    assert not (out / "config_changes.jsonl").exists()
    assert "algorithm" not in (out / "config.yaml").read_text() and "mode: sdpo" in (out / "config.yaml").read_text()


def test_eval_takes_task_options():
    from sdpo_fast.train.config import EvalConfig

    cfg = parse(EvalConfig, ["--model", "tiny-random", "--task-options", "digits", "2", "ops", "+"], prog="t")
    assert cfg.task_options == {"digits": "2", "ops": "+"}


def test_ctrl_c_ends_training_with_one_line(tmp_path):
    import signal

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "sdpo_fast.cli", "train", *TINY, "--output-dir", str(out),
                             "--max-steps", "50"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() or '"step": 1' not in (out / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "sdpo-fast train: interrupted (continue from the last checkpoint with --resume)"
