"""Teacher contexts: templates, demonstration choice, feedback switches, truncation, token ids."""

from __future__ import annotations

import pytest
import torch

from sdpo_fast.algorithm.reprompt import (
    FEEDBACK_TEMPLATE,
    REPROMPT_TEMPLATE,
    SOLUTION_TEMPLATE,
    RepromptConfig,
    assistant_header_ids,
    build_teacher_contexts,
    select_demonstrations,
    strip_thinking,
)
from sdpo_fast.models import load_tokenizer

DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
HEADER = "<|im_start|>assistant\n"
QUESTION = "What is 2+2?"
CLOSING = "\n\nCorrectly solve the original question."
SOLUTION = "\nCorrect solution:\n\n"
FEEDBACK = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _user(content: str) -> str:
    return f"{DEFAULT_SYSTEM}<|im_start|>user\n{content}<|im_end|>\n{HEADER}"


def _group(tok):
    """One group of four rollouts of one question: fail+feedback, success (with thinking), fail, success."""
    texts = ["It is 5.", "<think>2 plus 2\nis 4</think>\n\nIt is 4.", "It is 3.", "Four."]
    responses = [_ids(tok, t) + [tok.eos_token_id] for t in texts]
    messages = [[{"role": "user", "content": QUESTION}]] * 4
    rewards = [0.0, 1.0, 0.2, 0.5]
    feedback = ["Wrong: expected 4.", None, "   ", "Correct."]
    return messages, responses, rewards, ["q"] * 4, feedback


def test_templates_are_the_reference_templates():
    assert REPROMPT_TEMPLATE == "{prompt}{solution}{feedback}" + CLOSING
    assert SOLUTION_TEMPLATE == SOLUTION + "{successful_previous_attempt}"
    assert FEEDBACK_TEMPLATE == FEEDBACK + "{feedback_raw}"


def test_strip_thinking_removes_every_block_and_following_whitespace():
    assert strip_thinking("<think>a\nb</think>\n\nAnswer") == "Answer"
    assert strip_thinking("x <think>1</think> y <think>2</think>z") == "x y z"
    assert strip_thinking("no thinking") == "no thinking"


def test_demonstration_selection():
    # group a: fail, success, success, fail; group b: lone success; group c: no success (interleaved ids)
    rewards = [0.0, 0.9, 0.5, 0.1, 1.0, 0.0, 0.49, 0.0]
    groups = ["a", "a", "a", "a", "b", "b", "c", "c"]
    # a rollout is never its own demonstration: successes 1 and 2 demonstrate for each other
    assert select_demonstrations(rewards, groups) == [1, 2, 1, 1, None, 4, None, None]
    # without the switch every rollout of a group with a success takes the first one, itself included
    assert select_demonstrations(rewards, groups, self_demonstration=True) == \
        [1, 1, 1, 1, 4, 4, None, None]
    assert select_demonstrations(rewards, groups, success_reward_threshold=0.95) == \
        [None, None, None, None, None, 4, None, None]
    # demonstrations never cross groups, whatever the order; tensor ids compare by value
    assert select_demonstrations([1.0, 0.0, 0.0, 1.0], [1, 2, 1, 2]) == [None, 3, 0, None]
    assert select_demonstrations(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([1, 2, 1, 2])) == [None, 3, 0, None]
    with pytest.raises(ValueError, match="group_ids"):
        select_demonstrations([1.0], ["a", "b"])


@pytest.mark.parametrize(
    "switches, expected",
    [
        # defaults: every rollout gets the first OTHER success (1, or 3 for rollout 1) without thinking;
        # feedback only without a demonstration, so none is used here
        ({}, {0: QUESTION + SOLUTION + "It is 4." + CLOSING, 1: QUESTION + SOLUTION + "Four." + CLOSING,
              2: QUESTION + SOLUTION + "It is 4." + CLOSING, 3: QUESTION + SOLUTION + "It is 4." + CLOSING}),
        # feedback beside the demonstration; whitespace feedback (2) counts as none
        ({"environment_feedback_only_without_solution": False},
         {0: QUESTION + SOLUTION + "It is 4." + FEEDBACK + "Wrong: expected 4." + CLOSING,
          1: QUESTION + SOLUTION + "Four." + CLOSING, 2: QUESTION + SOLUTION + "It is 4." + CLOSING,
          3: QUESTION + SOLUTION + "It is 4." + FEEDBACK + "Correct." + CLOSING}),
        ({"include_environment_feedback": False},
         {0: QUESTION + SOLUTION + "It is 4." + CLOSING, 1: QUESTION + SOLUTION + "Four." + CLOSING,
          2: QUESTION + SOLUTION + "It is 4." + CLOSING, 3: QUESTION + SOLUTION + "It is 4." + CLOSING}),
        ({"remove_thinking_from_demonstration": False},
         {i: QUESTION + SOLUTION + "<think>2 plus 2\nis 4</think>\n\nIt is 4." + CLOSING for i in (0, 2, 3)}
         | {1: QUESTION + SOLUTION + "Four." + CLOSING}),
        ({"self_demonstration": True},
         {i: QUESTION + SOLUTION + "It is 4." + CLOSING for i in range(4)}),
    ],
)
def test_teacher_strings_for_switch_combinations(tok, switches, expected):
    messages, responses, rewards, groups, feedback = _group(tok)
    ctx = build_teacher_contexts(tok, messages, responses, rewards, groups, feedback, RepromptConfig(**switches))
    assert ctx.rows == sorted(expected)
    assert ctx.prompt_texts == [_user(expected[i]) for i in ctx.rows]
    assert ctx.mask.tolist() == [float(i in expected) for i in range(4)]
    for row, ids, start in zip(ctx.rows, ctx.input_ids, ctx.response_start):
        prompt = _ids(tok, _user(expected[row]))
        assert ids == prompt + responses[row]
        assert start == len(prompt)
        # the same ids as transformers' own chat-template tokenisation (the reference's route)
        chat = [{"role": "user", "content": expected[row]}]
        reference = tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)["input_ids"]
        assert ids[:start] == list(reference)


def test_feedback_only_exact_token_ids_with_system_message(tok):
    """A group without success: the feedback alone makes the teacher prompt; the system message is kept."""
    messages = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 2."}]] * 2
    ctx = build_teacher_contexts(tok, messages, [[504, 2988, 2], [504, 2]], [0.0, 0.0], [7, 7],
                                 ["Expected 4, got 5.", None])
    assert ctx.prompt_texts == [
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAdd 2 and 2.\nThe following is feedback "
        "from your unsuccessful earlier attempt:\n\nExpected 4, got 5.\n\nCorrectly solve the original "
        "question.<|im_end|>\n<|im_start|>assistant\n"]
    assert ctx.input_ids == [[
        1, 9690, 198, 6077, 5453, 30, 2, 198, 1, 4093, 198, 7684, 216, 34, 284, 216, 34, 30, 198, 504, 1695,
        314, 5850, 429, 469, 23775, 3685, 3110, 42, 198, 198, 39981, 216, 36, 28, 3363, 216, 37, 30, 198, 198,
        38323, 318, 5482, 260, 2798, 1962, 30, 2, 198, 1, 520, 9531, 198, 504, 2988, 2]]
    assert ctx.response_start == [54]
    assert ctx.rows == [0] and ctx.mask.tolist() == [1.0, 0.0]  # rollout 1: nothing to learn from


def test_nothing_to_learn_from_gives_no_teacher_input(tok):
    messages = [[{"role": "user", "content": QUESTION}]] * 3
    ctx = build_teacher_contexts(tok, messages, [[5], [6], [7]], [0.0, 0.0, 1.0], ["x", "x", "y"], None)
    assert ctx.rows == [] and ctx.input_ids == [] and ctx.response_start == []
    assert ctx.mask.dtype == torch.float32 and ctx.mask.tolist() == [0.0, 0.0, 0.0]
    assert ctx.metrics()["reprompt/reprompt_fraction"] == 0.0


def test_demonstration_text_defaults_to_decoded_ids_without_special_tokens(tok):
    messages = [[{"role": "user", "content": QUESTION}]] * 2
    responses = [_ids(tok, "No."), torch.tensor(_ids(tok, "Yes.") + [tok.eos_token_id])]  # ids may be tensors
    ctx = build_teacher_contexts(tok, messages, responses, [0.0, 1.0], [0, 0])
    assert ctx.prompt_texts == [_user(QUESTION + SOLUTION + "Yes." + CLOSING)]
    given = build_teacher_contexts(tok, messages, responses, [0.0, 1.0], [0, 0], response_texts=["No.", "Oui."])
    assert given.prompt_texts == [_user(QUESTION + SOLUTION + "Oui." + CLOSING)]


def test_left_truncation_keeps_the_assistant_header(tok, caplog):
    long_question = " ".join(f"word{i}" for i in range(200))
    messages = [[{"role": "user", "content": long_question}]]
    response = _ids(tok, "It is 4.")
    full = build_teacher_contexts(tok, messages, [response], [0.0], [0], ["Try again."])
    cut = build_teacher_contexts(tok, messages, [response], [0.0], [0], ["Try again."],
                                 RepromptConfig(max_reprompt_len=40))
    full_prompt = full.input_ids[0][:full.response_start[0]]
    assert len(full_prompt) > 40 and full.truncated == [False]
    assert cut.truncated == [True] and cut.response_start == [40]
    assert "1 of 1 teacher prompts were longer than max_reprompt_len=40" in caplog.text
    assert cut.input_ids[0] == full_prompt[-40:] + response
    header = assistant_header_ids(tok)
    assert header == _ids(tok, HEADER)
    assert cut.input_ids[0][40 - len(header):40] == header
    assert cut.metrics()["reprompt/truncated_fraction"] == 1.0


def test_metrics(tok):
    messages, responses, rewards, groups, feedback = _group(tok)
    messages = messages + [[{"role": "user", "content": "2+3?"}]] * 2
    ctx = build_teacher_contexts(tok, messages, responses + [[5], [6]], rewards + [0.0, 0.0],
                                 groups + ["r", "r"], feedback + ["Bad.", None])
    m = ctx.metrics()
    assert m["reprompt/success_group_fraction"] == 0.5
    assert m["reprompt/success_fraction"] == 2 / 6
    assert m["reprompt/demonstration_fraction"] == 4 / 6
    assert m["reprompt/feedback_available_fraction"] == 3 / 6
    assert m["reprompt/feedback_used_fraction"] == 1 / 6
    assert m["reprompt/reprompt_fraction"] == 5 / 6
    assert m["reprompt/teacher_tokens"] == sum(len(ids) for ids in ctx.input_ids)


def test_bad_inputs_raise(tok):
    user = [{"role": "user", "content": QUESTION}]
    with pytest.raises(ValueError, match="role 'user'"):
        build_teacher_contexts(tok, [user + [{"role": "assistant", "content": "4"}]], [[1]], [0.0], [0], ["f"])
    with pytest.raises(ValueError, match="rewards"):
        build_teacher_contexts(tok, [user], [[1]], [0.0, 1.0], [0], None)
    with pytest.raises(ValueError, match="max_reprompt_len"):
        build_teacher_contexts(tok, [user], [[1]], [0.0], [0], ["f"], RepromptConfig(max_reprompt_len=4))
    with pytest.raises(ValueError, match="max_reprompt_len"):
        RepromptConfig(max_reprompt_len=0)
    with pytest.raises(ValueError, match="solution_template"):
        RepromptConfig(solution_template="{demo}")
