"""Peak memory of one TRL SDPO training step, with and without the fused loss (FusedSDPOTrainer).

The same step — `compute_loss` + backward on one synthetic batch (live teacher, so student and teacher
forwards run on one model) — runs in TRL's `SDPOTrainer` (materialised [B, T, V] logits) and in
`sdpo_fast.integrations.trl.FusedSDPOTrainer` (hidden states + `linear_distill`), each in a fresh child
process. The model is small with a large vocabulary, so that the logits dominate, as they do for
Qwen-class vocabularies at long completions.

Memory of the step (`sdpo_fast.bench.memory`) = CPU: the child's peak RSS minus its RSS once model, trainer
and batch exist (children run under an address-space limit, so a step that does not fit reports "out of
memory"); CUDA: max_memory_allocated minus memory_allocated before the step. Both include the parameter
gradients, which every variant produces.

    python benchmarks/bench_trl_memory.py                                  # the default setting (CPU: ~2 min)
    python benchmarks/bench_trl_memory.py --batch 2 --completion-len 64    # quick look
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import tempfile
from datetime import date
from pathlib import Path

from sdpo_fast.bench.common import git_commit, median_times
from sdpo_fast.bench.memory import PeakMemory, in_child
from sdpo_fast.files import write_json

RESULTS = Path(__file__).parent / "results"
MODES = {
    "full_logits": dict(distillation_mode="full_logits", distillation_alpha=0.5),
    "topk_logits": dict(distillation_mode="topk_logits", distillation_topk=100, distillation_add_tail=True,
                        distillation_alpha=0.5),
    "sampled_token": dict(distillation_mode="sampled_token", distillation_alpha=1.0),
    # distillation_weight = 0: TRL's GRPO-style policy loss alone (token_logprobs / linear_logprobs)
    "policy_only": dict(distillation_weight=0.0),
}


def _step(variant: str, mode: str, args: argparse.Namespace) -> dict:
    """One child's figures: peak memory of the step beyond model, trainer and batch, median time, first loss."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

    from sdpo_fast.integrations.trl import FusedSDPOTrainer
    from sdpo_fast.models import load_tokenizer, tiny_random_model

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = tiny_random_model(args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                              num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                              num_key_value_heads=args.hidden // 64).to(device, dtype)
    config = SDPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, num_generations=2,
                        max_completion_length=args.completion_len, report_to=[], use_cpu=args.device == "cpu",
                        bf16=False, save_strategy="no", teacher_model_kind="live", **MODES[mode])
    cls = FusedSDPOTrainer if variant == "fused" else SDPOTrainer
    trainer = cls(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=config,
                  train_dataset=Dataset.from_dict({"prompt": ["x"] * 2}), processing_class=load_tokenizer())
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    inputs = _batch(args, device)
    for p in model.parameters():  # gradients exist before the baseline in both variants
        p.grad = torch.zeros_like(p)

    losses = []

    def step() -> None:
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        losses.append(loss.detach().item())

    memory = PeakMemory(device)
    (seconds,) = median_times([step], warmup=0, repeats=args.repeats, device=device)
    return {"step_mb": memory.extra_bytes() / 2**20, "ms": 1e3 * seconds, "loss": losses[0]}


def _batch(args: argparse.Namespace, device):
    """A TRL SDPO batch: prompts, completions (the last quarter padded in half the rows), teacher prompts
    twice as long, every rollout with a teacher."""
    import torch

    g = torch.Generator().manual_seed(1)
    b, p, t = args.batch, args.prompt_len, args.completion_len
    completion = torch.randint(3, args.vocab, (b, t), generator=g)
    completion_mask = torch.ones(b, t, dtype=torch.long)
    completion_mask[::2, 3 * t // 4:] = 0
    batch = {
        "prompt_ids": torch.randint(3, args.vocab, (b, p), generator=g),
        "prompt_mask": torch.ones(b, p, dtype=torch.long),
        "completion_ids": completion, "completion_mask": completion_mask,
        "teacher_input_ids": torch.cat([torch.randint(3, args.vocab, (b, 2 * p), generator=g), completion], 1),
        "teacher_attention_mask": torch.cat([torch.ones(b, 2 * p, dtype=torch.long), completion_mask], 1),
        "self_distillation_mask": torch.ones(b), "advantages": torch.randn(b, generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}


def measure(variant: str, mode: str, args: argparse.Namespace) -> dict:
    """Run one (variant, mode) in a fresh process and return its figures (or its error)."""
    limit = args.mem_limit_gb if args.device == "cpu" else None
    return in_child(_step, variant, mode, args, mem_limit_gb=limit)


def main() -> None:
    import torch
    from tqdm import tqdm

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="rollouts per step")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--completion-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151936, help="Qwen2/3's vocabulary size")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--repeats", type=int, default=2, help="steps per child (time: median)")
    parser.add_argument("--mem-limit-gb", type=float, default=16.0, help="CPU: address-space limit of each child")
    parser.add_argument("--out", type=Path, default=RESULTS / "trl_memory.json")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    rows = []
    for mode, variant in tqdm([(m, v) for m in args.modes for v in ("trl", "fused")], desc="SDPO step", unit="run"):
        rows.append({"mode": mode, "variant": variant, **measure(variant, mode, args)})

    print(f"\nB={args.batch} prompt={args.prompt_len} completion={args.completion_len} V={args.vocab} "
          f"H={args.hidden} layers={args.layers} {args.dtype} on {args.device}; logits of one side "
          f"[B, T, V] fp32 = {args.batch * args.completion_len * args.vocab * 4 / 2**20:.0f} MB")
    print(f"{'mode':>14} {'variant':>8} {'step MB':>9} {'vs TRL':>8} {'ms':>8} {'loss':>12}")
    for row in rows:
        if "error" in row:
            print(f"{row['mode']:>14} {row['variant']:>8} {row['error']}")
            continue
        trl = next((r for r in rows if r["mode"] == row["mode"] and r["variant"] == "trl" and "step_mb" in r), None)
        ratio = f"{100 * row['step_mb'] / trl['step_mb']:.1f}%" if trl else "-"
        print(f"{row['mode']:>14} {row['variant']:>8} {row['step_mb']:>9.0f} {ratio:>8} {row['ms']:>8.0f} "
              f"{row['loss']:>12.6g}")

    settings = {k: v for k, v in vars(args).items() if k != "out"}
    record = {"date": date.today().isoformat(), "commit": git_commit(), "machine": platform.processor() or
              platform.machine(), "cpus": mp.cpu_count(), **settings, "rows": rows}
    write_json(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
