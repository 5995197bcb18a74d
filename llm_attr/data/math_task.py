"""Built-in MATH-style task: seeded arithmetic / word / linear-equation problems with `\\boxed{}` answers.

Records are `{"id": "math-00012", "prompt": str, "response": str, "metadata": {"task": "math",
"answer": "8", "template": str}}`. Prompts and responses are short so that a tiny model can learn them;
every response shows brief working and ends with `The answer is \\boxed{<answer>}.`
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from fractions import Fraction

from .seeded import seeded_records

NAMES = ["Tom", "Anna", "Ben", "Maya", "Sam", "Lily", "Omar", "Zoe", "Leo", "Nina", "Ravi", "Emma"]
OBJECTS = ["apples", "pencils", "marbles", "stickers", "books", "cookies", "shells", "coins", "cards", "eggs"]

_Problem = tuple[str, str, int]  # (prompt, working, answer)


def _boxed(working: str, answer: int) -> str:
    return f"{working} The answer is \\boxed{{{answer}}}."


def _add(rng: random.Random) -> _Problem:
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    prompt = f"{name} has {a} {obj} and buys {b} more. How many {obj} does {name} have now?"
    return prompt, f"{a} + {b} = {a + b}.", a + b


def _sub(rng: random.Random) -> _Problem:
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    a = rng.randint(10, 30)
    b = rng.randint(1, a - 1)
    prompt = f"{name} has {a} {obj} and gives away {b}. How many {obj} are left?"
    return prompt, f"{a} - {b} = {a - b}.", a - b


def _mul(rng: random.Random) -> _Problem:
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    prompt = f"{name} has {a} boxes with {b} {obj} in each. How many {obj} are there in total?"
    return prompt, f"{a} * {b} = {a * b}.", a * b


def _div(rng: random.Random) -> _Problem:
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    b, q = rng.randint(2, 9), rng.randint(2, 9)
    prompt = f"{name} shares {b * q} {obj} equally among {b} friends. How many {obj} does each friend get?"
    return prompt, f"{b * q} / {b} = {q}.", q


def _two_step(rng: random.Random) -> _Problem:
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    a, b = rng.randint(5, 20), rng.randint(2, 10)
    c = rng.randint(1, a + b - 1)
    r = a + b - c
    prompt = f"{name} has {a} {obj}, buys {b} more, then gives away {c}. How many {obj} are left?"
    return prompt, f"{a} + {b} = {a + b}. {a + b} - {c} = {r}.", r


def _mul_sub(rng: random.Random) -> _Problem:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    c = rng.randint(1, 20)
    p = a * b
    return f"Compute {a} * {b} - {c}.", f"{a} * {b} = {p}. {p} - {c} = {p - c}.", p - c


def _add_mul(rng: random.Random) -> _Problem:
    a, b, c = rng.randint(1, 20), rng.randint(2, 9), rng.randint(2, 9)
    p = b * c
    return f"Compute {a} + {b} * {c}.", f"{b} * {c} = {p}. {a} + {p} = {a + p}.", a + p


def _paren_mul(rng: random.Random) -> _Problem:
    a, b, c = rng.randint(1, 12), rng.randint(1, 12), rng.randint(2, 6)
    s = a + b
    return f"Compute ({a} + {b}) * {c}.", f"{a} + {b} = {s}. {s} * {c} = {s * c}.", s * c


def _linear_plus(rng: random.Random) -> _Problem:
    a, x, b = rng.randint(2, 9), rng.randint(1, 12), rng.randint(1, 20)
    c = a * x + b
    working = f"{a}x = {c} - {b} = {a * x}. x = {a * x} / {a} = {x}."
    return f"Solve for x: {a}x + {b} = {c}.", working, x


def _linear_minus(rng: random.Random) -> _Problem:
    a, x = rng.randint(2, 9), rng.randint(2, 12)
    b = rng.randint(1, a * x - 1)
    c = a * x - b
    working = f"{a}x = {c} + {b} = {a * x}. x = {a * x} / {a} = {x}."
    return f"Solve for x: {a}x - {b} = {c}.", working, x


def _linear_paren(rng: random.Random) -> _Problem:
    a, x, b = rng.randint(2, 6), rng.randint(1, 10), rng.randint(1, 9)
    c = a * (x + b)
    working = f"x + {b} = {c} / {a} = {x + b}. x = {x + b} - {b} = {x}."
    return f"Solve for x: {a}(x + {b}) = {c}.", working, x


TEMPLATES: dict[str, Callable[[random.Random], _Problem]] = {
    "word_add": _add,
    "word_sub": _sub,
    "word_mul": _mul,
    "word_div": _div,
    "word_two_step": _two_step,
    "arith_mul_sub": _mul_sub,
    "arith_add_mul": _add_mul,
    "arith_paren_mul": _paren_mul,
    "linear_plus": _linear_plus,
    "linear_minus": _linear_minus,
    "linear_paren": _linear_paren,
}


ONE_STEP = ("word_add", "word_sub", "word_mul", "word_div")  # the level a 135M instruct model learns (>= 40%)


def make_math(n: int, seed: int = 0, templates: Sequence[str] | None = None) -> list[dict]:
    """`n` seeded math records (ids `math-00000`...); prompts are distinct while the template space allows.

    `templates`: the problem kinds drawn from (default all of `TEMPLATES`; `ONE_STEP` for a small real model).
    """
    names = sorted(templates or TEMPLATES)
    unknown = [t for t in names if t not in TEMPLATES]
    if unknown:
        raise ValueError(f"make_math: unknown template(s) {unknown}; known: {sorted(TEMPLATES)}")
    return seeded_records("math", n, seed, lambda rng, seen: _draw_math(rng, seen, names))


def _draw_math(rng: random.Random, seen: set[str], names: list[str]) -> dict:
    for _ in range(50):  # retry to avoid duplicate prompts; accept a duplicate if the space is exhausted
        template = rng.choice(names)
        prompt, working, answer = TEMPLATES[template](rng)
        if prompt not in seen:
            break
    return {"prompt": prompt, "response": _boxed(working, answer),
            "metadata": {"task": "math", "answer": str(answer), "template": template}}


_BOXED_START = re.compile(r"\\boxed\s*\{")


def boxed_span(text: str) -> tuple[int, int] | None:
    """`(start, end)` characters of the content of the last complete top-level `\\boxed{...}` (nested braces
    allowed), else None. An unterminated `\\boxed{` (e.g. a truncated generation) is ignored."""
    result: tuple[int, int] | None = None
    pos = 0
    while (m := _BOXED_START.search(text, pos)) is not None:
        depth, j = 1, m.end()
        while j < len(text) and depth:
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
            j += 1
        if depth:
            break
        result = (m.end(), j - 1)
        pos = j
    return result


def extract_boxed(text: str) -> str | None:
    """Content of the last complete top-level `\\boxed{...}` (nested braces allowed), else None.

    An unterminated `\\boxed{` (e.g. a truncated generation) is ignored.
    """
    span = boxed_span(text)
    return None if span is None else text[span[0] : span[1]]


_FRAC = re.compile(r"\\d?frac\{([^{}]+)\}\{([^{}]+)\}")
_THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d+)?")


def _normalise(s: str) -> str:
    """Strip whitespace, `$`, trailing `.`, a leading `x=`, and rewrite `\\frac{a}{b}` as `a/b`."""
    s = re.sub(r"\s+", "", s.replace("$", "")).rstrip(".")
    s = re.sub(r"^[A-Za-z]=", "", s)
    s = _FRAC.sub(r"(\1)/(\2)", s)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


def _as_number(s: str) -> Fraction | None:
    m = re.fullmatch(r"(-?)\(?(-?[\d.]+)\)?/\(?(-?[\d.]+)\)?", s)
    try:
        if m:
            value = Fraction(m.group(2)) / Fraction(m.group(3))
            return -value if m.group(1) else value
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def check_math(response: str, answer: str) -> bool:
    """True iff the last `\\boxed{}` in `response` equals `answer` after normalisation.

    Numbers compare exactly as fractions (`8` == `8.0` == `16/2`, `\\frac{1}{2}` == `0.5`); anything else
    compares as normalised strings. A response without a boxed answer is wrong.
    """
    got = extract_boxed(response)
    if got is None:
        return False
    got_n, ref_n = _normalise(got), _normalise(answer)
    if not got_n:
        return False
    a, b = _as_number(got_n), _as_number(ref_n)
    if a is not None and b is not None:
        return a == b
    return got_n == ref_n
