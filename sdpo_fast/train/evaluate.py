"""Held-out evaluation: greedy answers scored by the task's environment (correct = reward 1, all tests pass)."""

from __future__ import annotations

import torch

from sdpo_fast.envs import BatchEvaluator
from sdpo_fast.rollout import SamplingConfig, generate
from sdpo_fast.train.data import Task
from sdpo_fast.train.policy import quiet_cache_warning

_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>")


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The chat-templated prompt with the generation header, as token ids."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def eos_ids(tokenizer) -> list[int]:
    """Tokens that end a response: the tokenizer's EOS and the chat template's end-of-turn tokens."""
    ids = {tokenizer.eos_token_id}
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in _END_OF_TURN if t in vocab)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def heldout_correct(model, tokenizer, task: Task, problems: list[dict], evaluator: BatchEvaluator, *,
                    max_new_tokens: int, batch_size: int = 64) -> int:
    """How many of `problems` the model solves with greedy decoding."""
    if not problems:
        return 0
    prompts = [prompt_ids(tokenizer, task.messages(p)) for p in problems]
    with quiet_cache_warning():
        out = generate(model, prompts, 1, SamplingConfig(max_new_tokens, temperature=0.0),
                       eos_token_ids=eos_ids(tokenizer), pad_token_id=tokenizer.pad_token_id, batch_size=batch_size)
    texts = tokenizer.batch_decode(out.responses, skip_special_tokens=True)
    return sum(e.reward == 1.0 for e in evaluator.evaluate(problems, texts))
