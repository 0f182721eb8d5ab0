"""Self-teacher diagnostics: is the teacher's signal about what went wrong, or about style?

SDPO helps when the self-teacher, shown a demonstration or the environment's feedback, knows better than
the student *where* a rollout goes wrong. Three numbers say whether it does, from data a training step
already has (per-token teacher and student log-probs of the sampled tokens and the per-token divergence of
every rollout that has a teacher):

- `teacher/seq_adv_auc`: how well the sequence-level advantage A_i = sum_t (log p_T(y_t) - log p_S(y_t))
  ranks successful above failed rollouts of the same prompt: the fraction of (successful, failed) pairs of
  one group, both with a teacher, where the successful one has the larger A (ties count 1/2). 0.5 is
  chance; pairs only within a group, because teacher prompts (and so A's offset) differ between prompts.
- `teacher/answer_adv_failed`: on failed rollouts, the mean per-token log p_T - log p_S over the *answer
  tokens* (below): negative when the teacher, shown the feedback or a correct sibling, moves away from the
  wrong answer. (`teacher/answer_adv_success`: the same on successful rollouts, positive when it confirms.)
- `teacher/answer_div_share` against `teacher/answer_token_share`: the share of the summed per-token
  divergence (the loss) on answer tokens, and the share of tokens that are answer tokens; their ratio is
  `teacher/answer_div_concentration`. Near 1 the loss spreads over style tokens as much as over the answer;
  a small share means most of the full-distribution loss moves style, not correctness.
  `teacher/answer_abs_adv_share`: the same share for |log p_T - log p_S| of the sampled tokens, the weight
  of each token in sampled-token SDPO's loss.

Answer tokens: the response tokens whose decoded characters overlap the answer a direct-answer
environment reads (`AnswerEnv`): the value of the last "Answer: ..." line, else the last number. Responses
without either have none; for code tasks the notion does not apply (the metrics then describe whatever
number the text ends with).

Groups: `groups/all_failed_frac` is the fraction of prompts whose rollouts all failed (GRPO's advantage is
zero there); `teacher/all_failed_teacher_frac` the fraction of their rollouts with a teacher (feedback),
and `teacher/all_failed_div` their mean per-token divergence: SDPO's signal where GRPO has none.
Undefined values (no pairs, no answer tokens) are NaN.
"""

from __future__ import annotations

import bisect
import functools
import math
import re
from dataclasses import dataclass

import torch

from sdpo_fast.envs.tasks import ANSWER_LINE

_NUMBER = re.compile(r"-?\d[\d,]*")
NAN = float("nan")


def answer_char_span(text: str) -> tuple[int, int] | None:
    """[start, end) of the answer in a response: the last 'Answer: ...' line's value, else the last number."""
    lines = list(ANSWER_LINE.finditer(text))
    if lines:
        return lines[-1].span(1)
    numbers = list(_NUMBER.finditer(text))
    return numbers[-1].span() if numbers else None


def answer_token_mask(tokenizer, ids: list[int]) -> torch.Tensor:
    """[len(ids)] bool: the tokens whose decoded text overlaps `answer_char_span` of the decoded response.

    Token k spans [end(k - 1), end(k)) of the text, end(k) being the length of the decoded prefix
    ids[:k + 1]. Prefix lengths grow with k, so the span's first and last tokens are found by bisection:
    O(log T) prefix decodes instead of T (this runs on every rollout of every training step)."""
    mask = torch.zeros(len(ids), dtype=torch.bool)
    span = answer_char_span(tokenizer.decode(ids, skip_special_tokens=True))
    if span is None:
        return mask

    @functools.cache
    def end(k: int) -> int:
        return len(tokenizer.decode(ids[: k + 1], skip_special_tokens=True)) if k >= 0 else 0

    tokens = range(len(ids))
    first = bisect.bisect_left(tokens, True, key=lambda k: end(k) > span[0])  # first token ending after it starts
    stop = bisect.bisect_left(tokens, True, key=lambda k: end(k - 1) >= span[1])  # first starting at its end
    for k in range(first, stop):
        mask[k] = end(k) > end(k - 1)  # tokens that decode to no text of their own stay out
    return mask


def group_auc(scores: list[float], success: list[bool], groups: list[int]) -> float:
    """Fraction of (successful, failed) pairs within a group where the successful one scores higher (ties
    count 1/2); NaN without any such pair."""
    wins, pairs = 0.0, 0
    for g in set(groups):
        members = [i for i, gi in enumerate(groups) if gi == g]
        good = [scores[i] for i in members if success[i]]
        bad = [scores[i] for i in members if not success[i]]
        for s in good:
            for f in bad:
                wins += 1.0 if s > f else 0.5 if s == f else 0.0
                pairs += 1
    return wins / pairs if pairs else NAN


@dataclass
class RolloutScores:
    """Per-token values of one rollout with a teacher (response length each)."""

    advantage: torch.Tensor  # log p_T(y_t) - log p_S(y_t)
    divergence: torch.Tensor
    answer: torch.Tensor  # bool: answer tokens


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else NAN


def teacher_diagnostics(scores: dict[int, RolloutScores], success: list[bool], groups: list[int]) -> dict[str, float]:
    """The metrics of the module docstring for one batch. `scores`: rollout index -> its values, for the
    rollouts with a teacher; `success` and `groups` cover every rollout."""
    rows = sorted(scores)
    seq_adv = {i: float(scores[i].advantage.sum()) for i in rows}
    auc = group_auc([seq_adv[i] for i in rows], [success[i] for i in rows], [groups[i] for i in rows])

    def answer_adv(ok: bool) -> float:
        return _mean([float(scores[i].advantage[scores[i].answer].mean()) for i in rows
                      if success[i] == ok and scores[i].answer.any()])

    adv_total = sum(float(scores[i].advantage.abs().sum()) for i in rows)
    adv_answer = sum(float(scores[i].advantage[scores[i].answer].abs().sum()) for i in rows)
    div_total = sum(float(scores[i].divergence.sum()) for i in rows)
    div_answer = sum(float(scores[i].divergence[scores[i].answer].sum()) for i in rows)
    tokens = sum(scores[i].answer.numel() for i in rows)
    answer_tokens = sum(int(scores[i].answer.sum()) for i in rows)

    failed_groups = {g for g in set(groups) if not any(s for s, gi in zip(success, groups) if gi == g)}
    in_failed = [i for i, g in enumerate(groups) if g in failed_groups]
    taught = [i for i in in_failed if i in scores]
    failed_div = [float(scores[i].divergence.mean()) for i in taught if scores[i].divergence.numel()]
    return {
        "teacher/seq_adv_auc": auc,
        "teacher/seq_adv_success": _mean([seq_adv[i] for i in rows if success[i]]),
        "teacher/seq_adv_failed": _mean([seq_adv[i] for i in rows if not success[i]]),
        "teacher/answer_adv_failed": answer_adv(False),
        "teacher/answer_adv_success": answer_adv(True),
        "teacher/answer_div_share": div_answer / div_total if div_total > 0 else NAN,
        "teacher/answer_abs_adv_share": adv_answer / adv_total if adv_total > 0 else NAN,
        "teacher/answer_token_share": answer_tokens / tokens if tokens else NAN,
        "teacher/answer_div_concentration": (div_answer / div_total) / (answer_tokens / tokens)
        if div_total > 0 and answer_tokens else NAN,
        "groups/all_failed_frac": len(failed_groups) / max(len(set(groups)), 1),
        "teacher/all_failed_teacher_frac": len(taught) / len(in_failed) if in_failed else NAN,
        "teacher/all_failed_div": _mean(failed_div),
    }


class TeacherDiagnostics:
    """Collects a step's per-rollout values micro-batch by micro-batch (`add`), then `metrics()`.

    responses: every rollout's response token ids; contexts: the step's `TeacherContexts` (which rollouts
    have a teacher, success, groups).
    """

    def __init__(self, tokenizer, responses: list[list[int]], contexts) -> None:
        self.tokenizer, self.responses, self.contexts = tokenizer, responses, contexts
        self.taught = set(contexts.rows)
        self.scores: dict[int, RolloutScores] = {}

    def add(self, rows: list[int], out, mask: torch.Tensor) -> None:
        """`out`: the micro-batch's `DistillOutput` ([len(rows), T]); `mask`: its loss mask [len(rows), T]."""
        mask = mask.bool().cpu()
        advantage, divergence = out.advantage.detach().float().cpu(), out.divergence.detach().float().cpu()
        for j, i in enumerate(rows):
            if i in self.taught:
                n = len(self.responses[i])
                self.scores[i] = RolloutScores(advantage[j, :n], divergence[j, :n],
                                               answer_token_mask(self.tokenizer, self.responses[i]) & mask[j, :n])

    def metrics(self) -> dict[str, float]:
        return teacher_diagnostics(self.scores, self.contexts.success, self.contexts.groups)


def verdict(metrics: dict[str, float]) -> tuple[str, list[str]]:
    """('in regime' | 'marginal' | 'not in regime', reasons) from pre-flight metrics (see THRESHOLDS)."""
    checks = []
    for key, threshold, meaning in THRESHOLDS:
        value = metrics.get(key, NAN)
        passed = not math.isnan(value) and (value >= threshold if threshold > 0 else value <= threshold)
        word = "ok" if passed else ("undefined" if math.isnan(value) else "fails")
        checks.append((passed, f"{key} = {value:.3f} ({word}; want {'>=' if threshold > 0 else '<='} "
                               f"{threshold}: {meaning})"))
    passed = sum(p for p, _ in checks)
    label = "in regime" if passed == len(checks) else "not in regime" if passed == 0 else "marginal"
    return label, [text for _, text in checks]


# (metric, threshold, what passing means): necessary conditions, not a promise of a win. AUC 0.65 is about
# two standard errors above chance for the ~30-60 within-group pairs of a pre-flight batch; a correct-answer
# gain of 1 nat means the teacher is e times likelier than the student to write the right answer where
# the student failed; an answer share of 0.25 means at least a quarter of the full-distribution loss is
# about what the environment judges. On one-digit arithmetic SmolLM2-135M passes the first two and has a
# share of 0.11, and pure SDPO there loses accuracy while responses grow (docs/algorithm.md).
THRESHOLDS = [
    ("teacher/seq_adv_auc", 0.65, "the teacher prefers successful rollouts"),
    ("teacher/correct_answer_gain", 1.0, "in its context the teacher is likelier to write the right answer"),
    ("teacher/answer_div_share", 0.25, "the loss is about the answer, not about style"),
]
