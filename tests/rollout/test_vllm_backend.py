"""The vLLM rollout backend: weight names and gathering (CPU), its errors without vllm or a GPU, the
conversion of vLLM outputs to Rollouts, and (on a CUDA machine with vllm) the engine itself."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from sdpo_fast.models import tiny_random_model
from sdpo_fast.rollout import SamplingConfig, VLLMRollout, require_vllm
from sdpo_fast.rollout.vllm_backend import rollouts_from_outputs, write_engine_config
from sdpo_fast.train.parallel import Runtime, full_weights, hf_param_name, shard_model

VOCAB = 331


@pytest.mark.parametrize("wrapped,expected", [
    ("model.layers.0._checkpoint_wrapped_module.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("_fsdp_wrapped_module.model.layers.3._fsdp_wrapped_module._checkpoint_wrapped_module.mlp.up_proj.weight",
     "model.layers.3.mlp.up_proj.weight"),
    ("_orig_mod.model.embed_tokens.weight", "model.embed_tokens.weight"),
    ("model.norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
])
def test_hf_param_name_strips_wrapper_segments_only(wrapped, expected):
    assert hf_param_name(wrapped) == expected


@pytest.mark.parametrize("tied", [True, False])
def test_full_weights_of_a_checkpoint_wrapped_model_load_into_a_fresh_model(tied):
    model = tiny_random_model(VOCAB, tie_word_embeddings=tied, seed=1)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    shard_model(model, model, Runtime(0, 1, torch.device("cpu"), None), activation_checkpointing=True)
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())

    weights = dict(full_weights(model))
    assert all("_checkpoint_wrapped_module" not in n for n in weights)
    assert ("lm_head.weight" in weights) == (not tied)  # a tied head is the embedding, sent once
    fresh = tiny_random_model(VOCAB, tie_word_embeddings=tied, seed=2)
    missing, unexpected = fresh.load_state_dict(weights, strict=False)
    assert unexpected == [] and missing == ([] if not tied else ["lm_head.weight"])
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)

    half = dict(full_weights(model, dtype=torch.bfloat16))
    assert set(half) == set(weights) and all(t.dtype == torch.bfloat16 for t in half.values())


def test_full_weights_gathers_fsdp2_dtensors_one_parameter_at_a_time():
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor

        model = tiny_random_model(VOCAB, tie_word_embeddings=False, seed=3)
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        rt = Runtime(0, 1, torch.device("cpu"), init_device_mesh("cpu", (1,)))
        shard_model(model, model, rt, activation_checkpointing=True)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        items = full_weights(model)
        name, first = next(items)  # lazily gathered: one full tensor per item
        assert not isinstance(first, DTensor)
        weights = {name: first, **dict(items)}
        assert set(weights) == set(expected)
        for key, value in weights.items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    finally:
        dist.destroy_process_group()


def test_vllm_missing_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, as when not installed
    with pytest.raises(ImportError, match=r"vllm package, which is not installed.*sdpo-fast\[gpu\].*--rollout hf"):
        require_vllm("cuda")
    with pytest.raises(ImportError, match="not installed"):
        VLLMRollout(tiny_random_model(VOCAB), device=torch.device("cuda"))


def test_vllm_without_a_gpu_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU, but no CUDA GPU is available"):
        require_vllm("cuda")


def test_trainer_with_vllm_rollouts_fails_before_loading_a_model(tmp_path, monkeypatch):
    from sdpo_fast.cli import parse
    from sdpo_fast.train import trainer as trainer_module
    from sdpo_fast.train.config import TrainConfig

    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.setattr(trainer_module, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    cfg = parse(TrainConfig, ["--model", "tiny-random", "--rollout", "vllm", "--output-dir", str(tmp_path)], prog="t")
    with pytest.raises(ImportError, match="not installed"):
        trainer_module.Trainer(cfg)


@pytest.mark.parametrize("arch,cls", [("llama", "LlamaForCausalLM"), ("qwen3", "Qwen3ForCausalLM")])
def test_engine_config_names_the_architecture(tmp_path, arch, cls):
    import json

    model = tiny_random_model(VOCAB, arch=arch)
    assert not model.config.architectures  # built from a config: vLLM could not pick a model class
    write_engine_config(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [cls] and config["vocab_size"] == VOCAB
    assert not model.config.architectures  # the model's own config is left alone
    with pytest.raises(ValueError, match="not a Hugging Face model"):
        write_engine_config(SimpleNamespace(config=model.config), tmp_path)


def _completion(ids, logps, finish):
    return SimpleNamespace(token_ids=ids, finish_reason=finish,
                           logprobs=[{t: SimpleNamespace(logprob=lp)} for t, lp in zip(ids, logps)])


def test_rollouts_from_vllm_outputs():
    outputs = [SimpleNamespace(outputs=[_completion([5, 6, 2], [-0.5, -1.0, -0.1], "stop"),
                                        _completion([7, 8, 9, 9], [-2.0, -0.25, -3.0, -0.125], "length")]),
               SimpleNamespace(outputs=[_completion([2], [-0.75], "stop"), _completion([4, 2], [-1.5, -0.5], "stop")])]
    r = rollouts_from_outputs([[1, 3], [1]], 2, outputs)
    assert r.responses == [[5, 6, 2], [7, 8, 9, 9], [2], [4, 2]]
    assert r.truncated == [False, True, False, False]
    for got, want in zip(r.logprobs, [[-0.5, -1.0, -0.1], [-2.0, -0.25, -3.0, -0.125], [-0.75], [-1.5, -0.5]]):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=0, atol=0)
    assert r.prompts == [[1, 3], [1]] and r.group(3) == 1

    with pytest.raises(ValueError, match="expected n=2"):
        rollouts_from_outputs([[1]], 2, [SimpleNamespace(outputs=[_completion([2], [-1.0], "stop")])])
    no_logprobs = SimpleNamespace(token_ids=[3], finish_reason="stop", logprobs=None)
    with pytest.raises(ValueError, match="logprobs=0"):
        rollouts_from_outputs([[1]], 1, [SimpleNamespace(outputs=[no_logprobs])])


def _has_vllm() -> bool:
    try:
        require_vllm("cuda")
    except (ImportError, RuntimeError):
        return False
    return True


def _check_logprobs(model, prompts, rollouts, temperature):
    """The engine's log-probs are the model's at the sampling temperature (bf16 engine vs fp32 model)."""
    for i, y in enumerate(rollouts.responses):
        prompt = prompts[rollouts.group(i)]
        ids = torch.tensor([prompt + y], device="cuda")
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1].float() / temperature
        ref = logits.log_softmax(-1).gather(-1, ids[0, len(prompt):, None])[:, 0].cpu()
        diff = (rollouts.logprobs[i] - ref).abs()
        assert diff.mean() < 0.05 and diff.max() < 0.3, diff


@pytest.mark.gpu
@pytest.mark.skipif(not _has_vllm(), reason="needs the vllm package and a CUDA GPU")
def test_vllm_engine_samples_with_pushed_weights_and_matching_logprobs():
    model = tiny_random_model(4096, hidden_size=128, intermediate_size=256, num_attention_heads=2,
                              num_key_value_heads=1, seed=4).cuda()
    engine = VLLMRollout(model, device=torch.device("cuda"), gpu_memory_utilization=0.2, max_model_len=256,
                         dtype="bfloat16", enforce_eager=True)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 4096, (n,), generator=gen).tolist() for n in (40, 20)]  # full KV blocks get cached
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.7)
    try:
        engine.load_weights(full_weights(model, dtype=torch.bfloat16))
        r = engine.generate(prompts, 3, sampling, eos_token_ids=[0])
        assert len(r.responses) == 6 and all(len(lp) == len(y) for lp, y in zip(r.logprobs, r.responses))
        _check_logprobs(model, prompts, r, sampling.temperature)

        engine.sleep(discard_weights=True)
        with pytest.raises(RuntimeError, match="load_weights first"):
            engine.generate(prompts, 1, sampling, eos_token_ids=[0])
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        engine.load_weights(full_weights(model, dtype=torch.bfloat16))  # new weights, same prompts: no stale KV
        r = engine.generate(prompts, 2, sampling, eos_token_ids=[0])
        _check_logprobs(model, prompts, r, sampling.temperature)
    finally:
        engine.close()
