"""benchmarks/sdpo_vs_grpo.py: earlier results files of the same setting merge into one results file.

No training runs: every wanted (algorithm, seed) pair is found in the earlier files, so `main` only merges,
summarises and plots.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import sdpo_vs_grpo  # noqa: E402

CONFIG = {"model": "smollm2-135m", "task": "arithmetic", "max_steps": 2, "prompts_per_step": 2,
          "rollouts_per_prompt": 4, "eval": {"problems": 8, "every": 2}}


def results_file(path: Path, runs: dict[str, list[float]], config: dict = CONFIG) -> Path:
    """A results file as the script writes it, with `runs` {"algorithm/seed": accuracy at 0 and 16 generations}."""
    record = {"date": "2026-01-01", "commit": "abc", "command": "old command", "config": config,
              "max_steps": config["max_steps"], "runs": {}}
    for key, accuracy in runs.items():
        algorithm, seed = key.split("/")
        record["runs"][key] = {"algorithm": algorithm, "seed": int(seed), "generations": [0, 16],
                               "accuracy": accuracy, "times": {"step_s": 1.0, "generate_s": 0.5,
                                                               "train_s": 0.5, "response_len": 20.0},
                               "per_step": {"groups/all_failed_frac": [0.5, 0.25]}}
    path.write_text(json.dumps(record))
    return path


def test_prior_runs_are_renamed_and_merged(tmp_path: Path, monkeypatch) -> None:
    first = results_file(tmp_path / "a.json", {"sdpo/0": [0.5, 0.25], "grpo/0": [0.5, 0.75]})
    second = results_file(tmp_path / "b.json", {"sdpo/0": [0.5, 0.25], "sdpo/1": [0.25, 0.0],
                                                "grpo/1": [0.25, 0.5]})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "loss": {"mode": "sdpo_token", "alpha": 1.0}}))
    monkeypatch.setattr(sdpo_vs_grpo, "run", lambda *a: pytest.fail("a run was started although all are prior"))
    monkeypatch.setattr(sys, "argv", ["sdpo_vs_grpo.py", "--config", str(config), "--seeds", "0", "1",
                                      "--algorithms", "sdpo_token", "grpo", "--out", str(tmp_path),
                                      "--name", "merged", "--prior", str(first), str(second),
                                      "--rename", "sdpo=sdpo_token"])
    sdpo_vs_grpo.main()

    record = json.loads((tmp_path / "merged.json").read_text())
    assert list(record["runs"]) == ["sdpo_token/0", "sdpo_token/1", "grpo/0", "grpo/1"]
    assert record["runs"]["sdpo_token/1"]["source"]["file"] == str(second)
    assert record["runs"]["sdpo_token/1"]["source"]["algorithm"] == "sdpo"
    assert record["summary"]["sdpo_token"]["accuracy_mean"] == [0.375, 0.125]
    assert record["summary"]["grpo"]["accuracy_mean"] == [0.375, 0.625]
    assert record["summary"]["grpo"]["per_step_mean"]["groups/all_failed_frac"] == 0.375
    assert (tmp_path / "merged.png").exists()


def test_prior_with_another_setting_is_refused(tmp_path: Path) -> None:
    other = results_file(tmp_path / "a.json", {"grpo/0": [0.5, 0.75]}, {**CONFIG, "prompts_per_step": 4})
    with pytest.raises(ValueError, match="differ from --config in prompts_per_step"):
        sdpo_vs_grpo.load_prior([other], CONFIG, 2, {})


def test_prior_files_disagreeing_on_a_run_are_refused(tmp_path: Path) -> None:
    first = results_file(tmp_path / "a.json", {"grpo/0": [0.5, 0.75]})
    second = results_file(tmp_path / "b.json", {"grpo/0": [0.5, 0.5]})
    with pytest.raises(ValueError, match="run grpo/0 differs"):
        sdpo_vs_grpo.load_prior([first, second], CONFIG, 2, {})


def test_rename_needs_old_equals_new() -> None:
    assert sdpo_vs_grpo.parse_rename(["sdpo=sdpo_token"]) == {"sdpo": "sdpo_token"}
    with pytest.raises(ValueError, match="--rename: expected OLD=NEW"):
        sdpo_vs_grpo.parse_rename(["sdpo"])
