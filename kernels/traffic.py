"""FLOPs and HBM bytes of each Triton pass, before and after the L2-aware program order (a model, not a
measurement).

    python -m sdpo_fast.kernels.traffic

Assumptions (printed with the table): an H100 SXM (132 SMs, 50 MB L2, 3.35 TB/s HBM, 989 dense bf16
TFLOP/s), bf16 inputs, one resident program per SM (the kernels use 128-255 registers x 256 threads);
a tile stays in L2 while the resident programs keep reusing it and the working set fits in half of L2,
and is re-read from HBM otherwise; each kernel walks its K loop over the full hidden width.

"Before": row tile index fastest (forward: (row tiles, 2^k splits) with 128 x 128 tiles; backward:
(row tiles, column tiles) with 128 x 128 tiles): the resident programs span every row tile, whose
hidden states (N x (H + H_t) x 2 B) exceed L2, so each program re-reads its hidden rows from HBM at
every vocabulary tile; every weight tile is read once. "After": forward split index fastest (64 x 128
tiles, `num_splits`), backward grouped order (GROUP_ROWS row tiles sweep the columns, 128 x 64
tiles): the resident programs share R row tiles of hidden states that stay in L2 for their whole walk,
so hidden states are read once and the weights once per group of R row tiles.
"""

from __future__ import annotations

import math

SMS, L2, HBM, PEAK = 132, 50e6, 3.35e12, 989e12
N, H, H_T, V, B = 8192, 4096, 4096, 151936, 2
WORKSPACE = 256 << 20


def forward_pass(width: int, before: bool) -> tuple[float, float]:
    """(FLOPs, HBM bytes) of one forward pass over logits of hidden width `width` (H + H_t, or H)."""
    flops = 2.0 * N * V * width
    h_bytes, w_bytes = N * width * B, V * width * B
    if before:
        block_n, block_v = 128, 128
        return flops, h_bytes * math.ceil(V / block_v) + w_bytes
    from sdpo_fast.kernels.distill_forward import num_splits

    block_n = 64
    splits = num_splits(N, V, width, B, programs=2 * SMS, l2_bytes=int(L2))
    resident_rows = max(1, SMS // splits)
    return flops, h_bytes + w_bytes * math.ceil(N / block_n) / resident_rows


def grad_logits_pass(before: bool) -> tuple[float, float]:
    """(FLOPs, HBM bytes) of the G kernel over all chunks (student and teacher tiles, G written once)."""
    width = H + H_T
    flops = 2.0 * N * V * width
    chunk = min(V, WORKSPACE // (N * B) // 128 * 128)
    chunks = V / chunk
    h_bytes, w_bytes, g_bytes = N * width * B, V * width * B, N * V * B
    if before:
        block_n, block_v = 128, 128
        waves = math.ceil(N / block_n) * math.ceil(chunk / block_v) / SMS
        return flops, h_bytes * waves * chunks + w_bytes + g_bytes
    from sdpo_fast.kernels.common import GROUP_ROWS

    block_n = 128
    groups = math.ceil(N / block_n) / GROUP_ROWS.value
    return flops, h_bytes * chunks + w_bytes * groups + g_bytes


def rows() -> list[tuple[str, str, float, float]]:
    out = []
    for name, fn in (("forward stats (student + teacher)", lambda b: forward_pass(H + H_T, b)),
                     ("forward JSD pass", lambda b: forward_pass(H + H_T, b)),
                     ("forward student only (linear_logprobs)", lambda b: forward_pass(H, b)),
                     ("backward G recompute (with teacher)", grad_logits_pass)):
        for label, before in (("before", True), ("after", False)):
            flops, nbytes = fn(before)
            out.append((name, label, flops, nbytes))
    return out


def main() -> None:
    print(f"N={N}, H=H_t={H}, V={V}, bf16; {SMS} SMs, L2 {L2 / 1e6:.0f} MB, HBM {HBM / 1e12:.2f} TB/s, "
          f"{PEAK / 1e12:.0f} TFLOP/s; separate teacher head")
    print("| pass | order | TFLOP | GB from HBM | FLOP/B | ms at HBM rate | ms at peak FLOP/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, label, flops, nbytes in rows():
        print(f"| {name} | {label} | {flops / 1e12:.1f} | {nbytes / 1e9:.1f} | {flops / nbytes:.0f} | "
              f"{nbytes / HBM * 1e3:.1f} | {flops / PEAK * 1e3:.1f} |")


if __name__ == "__main__":
    main()
