"""Built-in tasks small enough for a CPU demo, generated deterministically, with programmatic feedback.

- "arithmetic": `a op b` with a `digits`-digit `a` and a `digits_b`-digit `b` (default: `digits`), op
  from `ops`. Answered directly.
- "string": one operation on a short word (reverse, length, count a letter, sort, drop vowels, ...),
  answered directly (knob: `ops`, `word_len`).
- "code": write a short Python string function (same operations), judged by `CodeEnv` with
  functional tests, so failures come back as runtime errors or wrong answers with inputs and outputs.

`make_problems(task, split, n, seed, **knobs)` returns `n` problem dicts. The split of a problem is a
hash of its prompt (1 in 5 held out), so "train" and "heldout" never share a problem whatever the seed.
Direct-answer problems are scored by `AnswerEnv`: the reply should end with a line `Answer: <answer>`;
without one, the last number (number answers) or the last quoted word (text answers) is taken, and
only a reply with neither is a format error. Its feedback names what was wrong, at the level of
`feedback`: "format" (only format problems),
"hint" (default: how the answer is wrong, without giving it away: too large or small, which digits or
characters differ, the expected length), or "answer" (also states the correct answer).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from sdpo_fast.envs.code_env import CodeEnv
from sdpo_fast.envs.outcome import Evaluation
from sdpo_fast.envs.sandbox import Limits

SPLITS = ("train", "heldout")
HELDOUT_BUCKETS = 5
FEEDBACK_LEVELS = ("format", "hint", "answer")
ANSWER_LINE = re.compile(r"^\W*answer\W*:\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_FALLBACK = {"number": re.compile(r"-?\d[\d,]*"), "text": re.compile(r"['\"`*]([A-Za-z]+)['\"`*]")}
FORMAT_FEEDBACK = "Format error: end your reply with one line of the form 'Answer: <your answer>'."
_WORDS = ("apple banana cherry dragon eleven forest garden harbor island jungle kitten lemon mango "
          "needle orange pepper quartz rabbit salmon tiger violet window yellow zebra bottle candle "
          "pencil rocket silver tunnel winter sugar planet river castle button mirror ladder "
          "anchor basket cactus dinner engine falcon guitar hammer insect jacket kettle lizard magnet "
          "napkin oyster parrot puzzle ribbon saddle teapot velvet walnut bridge camera donkey "
          "feather giraffe honey igloo jelly koala lantern meadow nectar olive pillow quiet robot "
          "spider tomato umbrella valley wizard crayon turtle cookie monkey pirate rainbow").split()
_VOWELS = set("aeiou")

# name -> (instruction for the direct task, docstring for the code task, function)
STRING_OPS = {
    "reverse": ("Write the word '{w}' backwards.", "Return s reversed.", lambda s: s[::-1]),
    "length": ("How many letters are in the word '{w}'?", "Return the number of characters in s.", len),
    "count_vowels": ("How many vowels (a, e, i, o, u) are in the word '{w}'?",
                     "Return how many characters of s are vowels (a, e, i, o, u).",
                     lambda s: sum(c in _VOWELS for c in s)),
    "upper": ("Write the word '{w}' in capital letters.", "Return s in upper case.", str.upper),
    "first_last": ("Write the first and the last letter of the word '{w}', together.",
                   "Return the first and the last character of s joined together.", lambda s: s[0] + s[-1]),
    "sort": ("Write the letters of the word '{w}' in alphabetical order, as one word.",
             "Return the characters of s sorted alphabetically, as one string.", lambda s: "".join(sorted(s))),
    "drop_vowels": ("Write the word '{w}' without its vowels (a, e, i, o, u).",
                    "Return s without its vowels (a, e, i, o, u).",
                    lambda s: "".join(c for c in s if c not in _VOWELS)),
    "double": ("Write every letter of the word '{w}' twice, e.g. 'cat' becomes 'ccaatt'.",
               "Return s with every character written twice, e.g. 'cat' -> 'ccaatt'.",
               lambda s: "".join(c + c for c in s)),
}


def make_problems(task: str, split: str, n: int, seed: int = 0, at_most: bool = False, **knobs) -> list[dict]:
    """`n` distinct problems of `task` from `split` ("train" or "heldout"), the same for the same args.

    With `at_most`, a task with fewer distinct problems gives all it has (at least one) instead of an error.
    """
    if task not in _GENERATORS:
        raise ValueError(f"task must be one of {sorted(_GENERATORS)}, got {task!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{task}/{seed}/{split}/{sorted(knobs.items())}")
    problems, seen = [], set()
    for _ in range(200 * n + 1000):
        if len(problems) == n:
            return problems
        problem = _GENERATORS[task](rng, **knobs)
        if problem["prompt"] not in seen and split_of(problem["prompt"]) == split:
            seen.add(problem["prompt"])
            problems.append(problem)
    if at_most and problems:
        return problems
    raise ValueError(f"cannot draw {n} distinct {split} problems of {task!r} with {knobs}: too few exist")


def split_of(prompt: str) -> str:
    """"heldout" for one prompt in HELDOUT_BUCKETS (by a stable hash), else "train"."""
    bucket = int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % HELDOUT_BUCKETS
    return "heldout" if bucket == 0 else "train"


def task_env(task: str, feedback: str = "hint", limits: Limits | None = None):
    """The environment that scores `task`'s problems."""
    if task == "code":
        return CodeEnv(limits=limits or Limits(cpu_s=1.0, wall_s=2.0))
    if task not in _GENERATORS:
        raise ValueError(f"task must be one of {sorted(_GENERATORS)}, got {task!r}")
    return AnswerEnv(feedback)


@dataclass(frozen=True)
class AnswerEnv:
    """Scores direct answers (`problem["answer"]`, `problem["kind"]` "number" or "text") with feedback."""

    feedback: str = "hint"

    def __post_init__(self) -> None:
        if self.feedback not in FEEDBACK_LEVELS:
            raise ValueError(f"feedback must be one of {FEEDBACK_LEVELS}, got {self.feedback!r}")

    def evaluate(self, problem: dict, response: str) -> Evaluation:
        if not isinstance(problem.get("answer"), str) or problem.get("kind") not in ("number", "text"):
            raise ValueError("a direct-answer problem needs 'answer' (str) and 'kind' ('number' or 'text')")
        found = ANSWER_LINE.findall(response) or _FALLBACK[problem["kind"]].findall(response)
        if not found:
            return Evaluation(0.0, FORMAT_FEEDBACK, {"format_error": True})
        given = found[-1].strip().strip(".'\"`*").strip()
        want = problem["answer"]
        details = {"format_error": False, "pred": given}
        if problem["kind"] == "number":
            given = given.replace(",", "")
            if not re.fullmatch(r"-?\d+", given):
                return Evaluation(0.0, "Format error: the answer must be a whole number written with digits "
                                       f"only, but it was '{given[:40]}'.", {**details, "format_error": True})
            if int(given) == int(want):
                return Evaluation(1.0, "", details)
            return Evaluation(0.0, self._number_feedback(int(given), int(want)), details)
        if given.lower() == want.lower():
            return Evaluation(1.0, "", details)
        return Evaluation(0.0, self._text_feedback(given.lower(), want.lower()), details)

    def _number_feedback(self, given: int, want: int) -> str:
        text = f"Your answer {given} is wrong."
        if self.feedback == "format":
            return text
        text += f" The correct result is {'larger' if want > given else 'smaller'}"
        g, w = str(abs(given)), str(abs(want))
        if (given < 0) != (want < 0):
            text += " and has the opposite sign"
        if len(g) != len(w):
            text += f" and has {len(w)} digits, not {len(g)}."
        else:
            wrong = [len(g) - i for i in range(len(g)) if g[i] != w[i]]
            places = ", ".join(_place(p) for p in sorted(wrong))
            text += f"; the {places} digit{'s are' if len(wrong) > 1 else ' is'} wrong."
        return text + (f" The correct answer is {want}." if self.feedback == "answer" else "")

    def _text_feedback(self, given: str, want: str) -> str:
        text = f"Your answer '{given}' is wrong."
        if self.feedback == "format":
            return text
        if len(given) != len(want):
            text += f" The correct answer has {len(want)} characters, yours has {len(given)}."
        else:
            first = next(i for i in range(len(want)) if given[i] != want[i])
            text += f" It has the right length but differs from character {first + 1} on."
        return text + (f" The correct answer is '{want}'." if self.feedback == "answer" else "")


def _place(position: int) -> str:
    names = {1: "ones", 2: "tens", 3: "hundreds", 4: "thousands"}
    return names.get(position, f"10^{position - 1}")


def _arithmetic(rng: random.Random, digits: int = 2, ops: str = "+-", digits_b: int = 0) -> dict:
    digits_b = digits_b or digits
    if not (1 <= digits <= 9 and 1 <= digits_b <= 9) or not ops or set(ops) - set("+-*"):
        raise ValueError(f"arithmetic needs 1 <= digits, digits_b <= 9 and ops from '+-*', "
                         f"got {digits}, {digits_b}, {ops!r}")
    a, b, op = _number(rng, digits), _number(rng, digits_b), rng.choice(ops)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    prompt = f"What is {a} {op} {b}? End your reply with a line 'Answer: <number>'."
    return {"prompt": prompt, "answer": str(value), "kind": "number", "task": "arithmetic"}


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1)


def _string_task(rng: random.Random, ops: str = "reverse,length,count_vowels,upper,first_last,sort,"
                 "drop_vowels,double", word_len: int = 0) -> dict:
    op = rng.choice(_ops(ops))
    word = _word(rng, word_len)
    instruction, _, function = STRING_OPS[op]
    value = function(word)
    prompt = f"{instruction.format(w=word)} End your reply with a line 'Answer: <answer>'."
    kind = "number" if isinstance(value, int) else "text"
    return {"prompt": prompt, "answer": str(value), "kind": kind, "task": "string", "op": op}


def _code_task(rng: random.Random, ops: str = "reverse,length,count_vowels,upper,first_last,sort,"
               "drop_vowels,double", tests: int = 4, word_len: int = 0) -> dict:
    op = rng.choice(_ops(ops))
    _, doc, function = STRING_OPS[op]
    name = f"{op}_word" if op in ("reverse", "length", "upper", "sort", "double") else op
    inputs = []
    while len(inputs) < tests:
        word = _word(rng, word_len)
        if word not in inputs:
            inputs.append(word)
    prompt = (f"Write a Python function `{name}(s: str)`. {doc} Example: {name}({inputs[0]!r}) == "
              f"{function(inputs[0])!r}. Give the code in a ```python block.")
    test = "def check(candidate):\n" + "".join(f"    assert candidate({w!r}) == {function(w)!r}\n" for w in inputs)
    return {"prompt": prompt, "test": test, "entry_point": name, "task": "code", "op": op}


def _ops(ops: str) -> list[str]:
    names = [o.strip() for o in ops.split(",") if o.strip()]
    unknown = set(names) - set(STRING_OPS)
    if not names or unknown:
        raise ValueError(f"ops must be a comma-separated subset of {sorted(STRING_OPS)}, got {ops!r}")
    return names


def _word(rng: random.Random, word_len: int) -> str:
    """A dictionary word (word_len=0) or random lowercase letters of that length."""
    if word_len == 0:
        return rng.choice(_WORDS)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(word_len))


_GENERATORS = {"arithmetic": _arithmetic, "string": _string_task, "code": _code_task}
