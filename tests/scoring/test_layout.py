"""The prefix forest, its packing into rows, and the attention pattern in each backend's form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdpo_fast.scoring import attention
from sdpo_fast.scoring.attention import attention_inputs, prefix_attention
from sdpo_fast.scoring.masks import block_mask, dense_mask
from sdpo_fast.scoring.packing import pack_forest, query_index
from sdpo_fast.scoring.trie import build_forest
from tests.scoring.conftest import mixed_batch, rel_err


def arrays(seqs):
    return [np.asarray(s, dtype=np.int64) for s in seqs]


def random_forest_inputs(seed: int, anchored: bool = False):
    """Sequences with several levels of shared prefixes (a small alphabet makes deep sharing likely)."""
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, 3, size=rng.integers(1, 12)) for _ in range(40)]
    anchors = None
    if anchored:  # a cached prefix of 2 or 3 tokens per "prompt" key, as the teacher pass builds them
        seqs = [np.concatenate([rng.integers(0, 3, 3), s]) for s in seqs]
        anchors = [(("p", i % 2), 2 + i % 2) for i in range(len(seqs))]
    return seqs, anchors


def test_forest_of_a_small_example():
    seqs = arrays([[1, 2, 3], [1, 2, 4, 5], [1, 2, 3], [1, 2], [7], [1, 2, 4]])
    forest = build_forest(seqs)
    spans = [(n.seq, n.start, n.end, n.parent) for n in forest.nodes]
    tokens = [seqs[n.seq][n.start:n.end].tolist() for n in forest.nodes]
    assert tokens == [[1, 2], [3], [4], [5], [7]]  # preorder
    assert [s[3] for s in spans] == [-1, 0, 0, 2, -1]
    assert forest.leaf_of == [1, 3, 1, 0, 4, 2]
    assert forest.subtree_end.tolist() == [4, 2, 4, 4, 5]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("anchored", [False, True])
def test_forest_paths_spell_every_sequence(seed, anchored):
    seqs, anchors = random_forest_inputs(seed, anchored)
    forest = build_forest(seqs, anchors)
    for i, s in enumerate(seqs):
        path = forest.path(forest.leaf_of[i])
        nodes = [forest.nodes[n] for n in path]
        assert nodes[0].start == 0 and nodes[-1].end == len(s)
        assert all(a.end == b.start for a, b in zip(nodes, nodes[1:]))
        if anchored:
            assert nodes[0].anchor == anchors[i] and nodes[0].end == anchors[i][1]
        for n in (nodes[1:] if anchored else nodes):
            assert seqs[n.seq][n.start:n.end].tolist() == s[n.start:n.end].tolist()
    for n, node in enumerate(forest.nodes):  # compressed: siblings differ in their first token
        firsts = [seqs[forest.nodes[c].seq][forest.nodes[c].start] for c in node.children]
        assert len(set(firsts)) == len(firsts)
        assert all(forest.nodes[c].parent == n and c > n for c in node.children)


@pytest.mark.parametrize("budget", [1, 7, 20, 1000])
def test_rows_hold_whole_paths_within_the_budget(budget):
    seqs, _ = random_forest_inputs(7)
    forest = build_forest(seqs)
    packed = pack_forest(forest, seqs, budget)
    for row in packed.rows:
        assert all(forest.nodes[n].parent in row or forest.nodes[n].parent == -1 for n in row)  # closed upwards
        used = sum(forest.nodes[n].size for n in row)
        longest_path = max(sum(forest.nodes[a].size for a in forest.path(n)) for n in row)
        assert used <= max(budget, longest_path)
    covered = set().union(*map(set, packed.rows))
    assert covered == set(range(len(forest.nodes)))
    for i, s in enumerate(seqs):  # the gathered tokens of each sequence are its own, at its own positions
        index = query_index(forest, packed, i, 0, len(s))
        assert packed.input_ids.reshape(-1)[index].tolist() == s.tolist()
        assert packed.position_ids.reshape(-1)[index].tolist() == list(range(len(s)))
    if budget >= 1000:
        assert len(packed.rows) == 1 and packed.shape[1] == sum(n.size for n in forest.nodes)


def brute_force_mask(forest, packed) -> torch.Tensor:
    """The packed rule from its definition: a query sees its own node's earlier keys and its ancestors' keys."""
    r_count, lq = packed.shape
    lk = packed.k_lo.shape[1]
    lc = lk - lq
    owner = np.full((r_count, lk), -1)
    for r in range(r_count):
        for n, at in packed.k_offset[r].items():
            owner[r, at:at + forest.nodes[n].size] = n
    mask = torch.zeros(r_count, 1, lq, lk, dtype=torch.bool)
    for r in range(r_count):
        for q in range(lq):
            n = owner[r, lc + q]
            if n == -1:  # padding: only itself
                mask[r, 0, q, lc + q] = True
                continue
            ancestors = set(forest.path(n))
            for k in range(lc + q + 1):
                mask[r, 0, q, k] = owner[r, k] in ancestors
    return mask


@pytest.mark.parametrize("anchored,budget", [(False, 1000), (False, 9), (True, 1000), (True, 9)])
def test_dense_mask_is_the_packed_rule(anchored, budget):
    seqs, anchors = random_forest_inputs(11, anchored)
    seqs, anchors = seqs[:12], anchors[:12] if anchors else None
    forest = build_forest(seqs, anchors)
    cached = {a: np.arange(a[1]) for a in set(anchors)} if anchors else None
    packed = pack_forest(forest, seqs, budget, cached)
    assert torch.equal(dense_mask(packed, torch.device("cpu")), brute_force_mask(forest, packed))


def packed_qkv(seed: int, heads: int = 4, kv_heads: int = 2, dim: int = 8):
    """A packed layout (with a cached region) and random q/k/v of its shapes."""
    seqs, anchors = random_forest_inputs(seed, anchored=True)
    seqs, anchors = seqs[:16], anchors[:16]
    forest = build_forest(seqs, anchors)
    packed = pack_forest(forest, seqs, 30, {a: np.arange(a[1]) for a in set(anchors)})
    r_count, lq = packed.shape
    lk = packed.k_lo.shape[1]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(r_count, heads, lq, dim, generator=gen)
    k = torch.randn(r_count, kv_heads, lk, dim, generator=gen)
    v = torch.randn(r_count, kv_heads, lk, dim, generator=gen)
    return forest, packed, q, k, v


def masked_sdpa(packed, q, k, v) -> torch.Tensor:
    """Reference attention with the dense mask, as [R, Lq, H, D]."""
    rep = q.shape[1] // k.shape[1]
    mask = dense_mask(packed, q.device)
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)
    return out.transpose(1, 2)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_block_mask_matches_the_dense_mask():
    """FlexAttention (eager, forward only on CPU) with our BlockMask equals SDPA with the dense mask."""
    from torch.nn.attention.flex_attention import flex_attention

    forest, packed, q, k, v = packed_qkv(3)
    out = flex_attention(q, k, v, block_mask=block_mask(packed, q.device), enable_gqa=True)
    assert rel_err(out.transpose(1, 2), masked_sdpa(packed, q, k, v)) < 1e-5


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash-attn's varlen semantics in plain torch: per segment, causal aligned bottom-right."""
    assert causal and dropout_p == 0.0
    outs = []
    for i in range(len(cu_q) - 1):
        qs = q[cu_q[i]:cu_q[i + 1]].transpose(0, 1)
        ks, vs = (t[cu_k[i]:cu_k[i + 1]].transpose(0, 1).repeat_interleave(q.shape[1] // k.shape[1], 0)
                  for t in (k, v))
        assert qs.shape[1] <= max_q and ks.shape[1] <= max_k
        mask = torch.ones(qs.shape[1], ks.shape[1], dtype=torch.bool).tril(ks.shape[1] - qs.shape[1])
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=softmax_scale).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("backend", ["flash", "segments"])
def test_segment_layouts_match_the_dense_mask(backend, monkeypatch):
    """The varlen index layout (run by a plain-torch stand-in for flash-attn) and the batched-SDPA segments
    give the dense-mask attention at every real query, values and gradients."""
    monkeypatch.setattr(attention, "_varlen_kernel", lambda: reference_varlen)
    forest, packed, q, k, v = packed_qkv(5)
    real = torch.from_numpy(packed.q_node < len(forest.nodes))
    mask, extra = attention_inputs(backend, None, forest, packed, q.device, q.dtype)
    weights = torch.randn(*packed.shape, q.shape[1], q.shape[3])

    def run(fn):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = fn(qq, kk, vv)[real]
        (out * weights[real]).sum().backward()
        return out, [t.grad for t in (qq, kk, vv)]

    out, grads = run(lambda qq, kk, vv: prefix_attention(None, qq, kk, vv, mask, scaling=q.shape[-1] ** -0.5,
                                                         **extra)[0])
    ref, ref_grads = run(lambda qq, kk, vv: masked_sdpa(packed, qq, kk, vv))
    assert rel_err(out, ref) < 1e-5
    assert all(rel_err(g, r) < 1e-5 for g, r in zip(grads, ref_grads))


def test_mixed_batch_layout_counts():
    """The test batch really exercises sharing: far fewer computed tokens than the padded batch."""
    seqs, starts = mixed_batch(torch.Generator().manual_seed(0))
    inputs = arrays([s[:-1] for s in seqs])
    forest = build_forest(inputs)
    assert sum(n.size for n in forest.nodes) < sum(len(x) for x in inputs) - 4 * 16
    assert len(forest.roots) == 4
