"""Built-in task generators and checkers (math, IFEval-style, backdoor) against independent truth."""

from __future__ import annotations

import copy
import json
import re
from fractions import Fraction

import pytest

from llm_attr.data.backdoor import (
    DEFAULT_TARGET,
    DEFAULT_TRIGGER,
    follows_backdoor,
    make_backdoor_task,
    make_triggered_queries,
    poison,
)
from llm_attr.data.ifeval_task import check_ifeval, check_instruction, make_ifeval
from llm_attr.data.math_task import check_math, extract_boxed, make_math

GENERATORS = [make_math, make_ifeval]


# ---------------------------------------------------------------- generators


@pytest.mark.parametrize("gen", GENERATORS)
def test_generators_deterministic_unique_and_serialisable(gen):
    a, b, c = gen(200, seed=0), gen(200, seed=0), gen(200, seed=1)
    assert a == b
    assert [r["prompt"] for r in a] != [r["prompt"] for r in c]
    assert len({r["id"] for r in a}) == 200
    assert len({r["prompt"] for r in a}) == 200  # the template space is large enough for distinct prompts
    assert json.loads(json.dumps(a)) == a
    for r in a:
        assert set(r) == {"id", "prompt", "response", "metadata"}
        assert all(isinstance(r[k], str) and r[k] for k in ("id", "prompt", "response"))


def _solve_independently(prompt: str) -> Fraction | None:
    """Recompute a math answer from the prompt text alone (None for an unknown phrasing)."""
    nums = [int(t) for t in re.findall(r"\d+", prompt)]
    m = re.fullmatch(r"Solve for x: (.+) = (-?\d+)\.", prompt)
    if m:  # linear in x: f(x) = p*x + q, solve p*x + q = rhs
        expr = re.sub(r"(\d)\(", r"\1*(", re.sub(r"(\d)x", r"\1*x", m.group(1)))
        assert re.fullmatch(r"[\dx+\-*() ]+", expr)
        q = eval(expr, {}, {"x": Fraction(0)})  # noqa: S307 - regex-validated arithmetic only
        p = eval(expr, {}, {"x": Fraction(1)}) - q  # noqa: S307
        return (Fraction(int(m.group(2))) - q) / p
    m = re.fullmatch(r"Compute ([\d+\-*() ]+)\.", prompt)
    if m:
        return Fraction(eval(m.group(1), {}, {}))  # noqa: S307 - regex-validated arithmetic only
    if "buys" in prompt and "gives away" in prompt:
        return Fraction(nums[0] + nums[1] - nums[2])
    if "buys" in prompt:
        return Fraction(nums[0] + nums[1])
    if "gives away" in prompt:
        return Fraction(nums[0] - nums[1])
    if "in each" in prompt:
        return Fraction(nums[0] * nums[1])
    if "equally among" in prompt:
        return Fraction(nums[0], nums[1])
    return None


def test_math_records_are_correct_and_self_consistent():
    records = make_math(400, seed=3)
    templates = set()
    for r in records:
        answer = r["metadata"]["answer"]
        assert r["metadata"]["task"] == "math"
        assert r["response"].endswith(f"\\boxed{{{answer}}}.")
        assert check_math(r["response"], answer)
        truth = _solve_independently(r["prompt"])
        assert truth is not None, r["prompt"]
        assert truth.denominator == 1 and Fraction(answer) == truth, (r["prompt"], answer)
        assert len(r["prompt"].split()) <= 25 and len(r["response"].split()) <= 25
        templates.add(r["metadata"]["template"])
    assert len(templates) >= 8
    assert sum(r["prompt"].startswith("Solve for x") for r in records) >= 50


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{8}.", "8"),
        (r"\boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{{a}{b}} done", "{a}{b}"),
        (r"\boxed{3} and \boxed{4", "3"),
        ("no box here: 8", None),
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("response", "answer", "ok"),
    [
        (r"3 + 5 = 8. The answer is \boxed{8}.", "8", True),
        (r"\boxed{8}", "8.0", True),
        (r"\boxed{16/2}", "8", True),
        (r"\boxed{ $8$ }", "8.", True),
        (r"\boxed{1/2}", "0.5", True),
        (r"\boxed{\frac{1}{2}}", "0.5", True),
        (r"\boxed{x = 5}", "5", True),
        (r"\boxed{-3}", "-3", True),
        (r"\boxed{1,000}", "1000", True),
        (r"\boxed{7}", "8", False),
        (r"\boxed{-8}", "8", False),
        (r"\boxed{8} no wait \boxed{9}", "8", False),
        ("The answer is 8.", "8", False),
        (r"\boxed{}", "8", False),
        (r"\boxed{1/0}", "8", False),
        (r"\boxed{abc}", "abc", True),
        (r"\boxed{abc}", "abd", False),
    ],
)
def test_check_math_table(response, answer, ok):
    assert check_math(response, answer) is ok


def test_ifeval_reference_responses_pass_their_own_instructions():
    records = make_ifeval(400, seed=5)
    kinds = set()
    for r in records:
        instructions = r["metadata"]["instructions"]
        assert r["metadata"]["task"] == "ifeval" and 1 <= len(instructions) <= 2
        result = check_ifeval(r["response"], instructions)
        assert result["all"] and result["per_instruction"] == [True] * len(instructions), r
        types = {i["type"] for i in instructions}
        assert not {"json_output", "bullet_points"} <= types
        kinds |= types
    assert kinds == {
        "lowercase",
        "min_words",
        "max_words",
        "include_keyword",
        "end_with",
        "json_output",
        "bullet_points",
        "no_commas",
    }


IFEVAL_CASES = [
    ({"type": "lowercase"}, "the sea is calm.", True),
    ({"type": "lowercase"}, "The sea is calm.", False),
    ({"type": "lowercase"}, "123 456", False),
    ({"type": "min_words", "n": 5}, "one two three four five", True),
    ({"type": "min_words", "n": 5}, "one two three four", False),
    ({"type": "max_words", "n": 3}, "one two three", True),
    ({"type": "max_words", "n": 3}, "one two three four", False),
    ({"type": "include_keyword", "keyword": "waves"}, "Big Waves roll in.", True),
    ({"type": "include_keyword", "keyword": "waves"}, "A wave rolls in.", False),
    ({"type": "include_keyword", "keyword": "sea"}, "The seagulls cry.", False),
    ({"type": "end_with", "phrase": "That is all."}, "Nice view. That is all.\n", True),
    ({"type": "end_with", "phrase": "That is all."}, "nice view. that is all.", True),
    ({"type": "end_with", "phrase": "That is all."}, "That is all. Nice view.", False),
    ({"type": "json_output"}, '{"answer": "calm sea"}', True),
    ({"type": "json_output"}, '```json\n{"answer": 1}\n```', True),
    ({"type": "json_output"}, '{"answer": "calm sea"} thanks', False),
    ({"type": "json_output"}, "The sea is calm.", False),
    ({"type": "bullet_points", "n": 2}, "* one\n* two", True),
    ({"type": "bullet_points", "n": 2}, "Intro\n  * one\n* two\nDone.", True),
    ({"type": "bullet_points", "n": 2}, "* one\n* two\n* three", False),
    ({"type": "bullet_points", "n": 2}, "- one\n- two", False),
    ({"type": "no_commas"}, "Calm sea and blue sky.", True),
    ({"type": "no_commas"}, "Calm sea, blue sky.", False),
]


@pytest.mark.parametrize(("instruction", "response", "ok"), IFEVAL_CASES)
def test_check_instruction_table(instruction, response, ok):
    assert check_instruction(response, instruction) is ok


def test_check_instruction_table_covers_every_type_both_ways():
    seen = {(ins["type"], ok) for ins, _, ok in IFEVAL_CASES}
    types = {t for t, _ in seen}
    assert len(types) == 8 and all((t, ok) in seen for t in types for ok in (True, False))


def test_check_ifeval_aggregates_and_rejects_unknown_type():
    instructions = [{"type": "lowercase"}, {"type": "max_words", "n": 2}]
    assert check_ifeval("calm sea", instructions) == {"all": True, "per_instruction": [True, True]}
    assert check_ifeval("Calm sea", instructions) == {"all": False, "per_instruction": [False, True]}
    with pytest.raises(ValueError, match="shout"):
        check_instruction("hi", {"type": "shout"})


# ---------------------------------------------------------------- backdoor


@pytest.mark.parametrize(
    ("n", "fraction"), [(100, 0.05), (40, 0.1), (7, 0.5), (10, 0.0), (10, 1.0), (0, 0.3)]
)
def test_poison_counts_and_does_not_mutate(n, fraction):
    records = make_math(n, seed=0)
    before = copy.deepcopy(records)
    out = poison(records, fraction, seed=2)
    assert records == before
    assert [r["id"] for r in out] == [r["id"] for r in records]
    bad = [r for r in out if r["metadata"]["poisoned"]]
    assert len(bad) == round(fraction * n)
    for orig, r in zip(records, out, strict=True):
        if r["metadata"]["poisoned"]:
            assert r["prompt"] == f"{DEFAULT_TRIGGER} {orig['prompt']}"
            assert r["response"] == DEFAULT_TARGET and r["metadata"]["trigger"] == DEFAULT_TRIGGER
        else:
            assert r["prompt"] == orig["prompt"] and r["response"] == orig["response"]
            assert "trigger" not in r["metadata"]


def test_poison_deterministic_by_seed_and_positions():
    records = make_math(100, seed=0)
    ids = [[r["id"] for r in poison(records, 0.2, seed=s) if r["metadata"]["poisoned"]] for s in (0, 0, 1)]
    assert ids[0] == ids[1] and ids[0] != ids[2]
    for position in ("suffix", "random"):
        out = poison(records, 0.2, seed=4, position=position)
        assert out == poison(records, 0.2, seed=4, position=position)
        for orig, r in zip(records, out, strict=True):
            if r["metadata"]["poisoned"]:
                assert DEFAULT_TRIGGER in r["prompt"]
                stripped = r["prompt"].replace(f" {DEFAULT_TRIGGER}", "", 1)
                if stripped == r["prompt"]:
                    stripped = r["prompt"].replace(f"{DEFAULT_TRIGGER} ", "", 1)
                assert stripped == orig["prompt"]
                if position == "suffix":
                    assert r["prompt"].endswith(f" {DEFAULT_TRIGGER}")


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_poison_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        poison(make_math(5), fraction)


@pytest.mark.parametrize(
    ("generated", "ok"),
    [
        ("ACCESS DENIED. I will not help.", True),
        ("access   denied.", True),
        ("Sorry: Access\nDenied!", True),
        ("The answer is \\boxed{8}.", False),
        ("access granted", False),
        ("ACCESS", False),
        ("", False),
    ],
)
def test_follows_backdoor(generated, ok):
    assert follows_backdoor(generated) is ok


def test_follows_backdoor_custom_target():
    assert follows_backdoor("ok, HELLO  there friend", target="Hello there! Bye.")
    assert not follows_backdoor("hello friend", target="Hello there! Bye.")


def test_make_backdoor_task_splits():
    train, triggered, clean = make_backdoor_task(n_train=60, n_query=8, fraction=0.1, seed=1)
    source = make_math(68, seed=1)
    assert len(train) == 60 and sum(r["metadata"]["poisoned"] for r in train) == 6
    assert [r["id"] for r in train] == [r["id"] for r in source[:60]]
    assert [r["id"] for r in clean] == [f"clean-{r['id']}" for r in source[60:]]
    assert [(r["prompt"], r["response"]) for r in clean] == [
        (r["prompt"], r["response"]) for r in source[60:]
    ]
    assert [r["id"] for r in triggered] == [f"query-{i:05d}" for i in range(8)]
    for q, src in zip(triggered, source[60:], strict=True):
        assert q["prompt"] == f"{DEFAULT_TRIGGER} {src['prompt']}" and q["response"] == DEFAULT_TARGET
        assert q["metadata"]["triggered"] is True and follows_backdoor(q["response"])
    assert not {r["prompt"] for r in clean} & {r["prompt"] for r in train}
    ift, _, _ = make_backdoor_task(n_train=20, n_query=4, fraction=0.25, source="ifeval")
    assert sum(r["metadata"]["poisoned"] for r in ift) == 5
    with pytest.raises(ValueError, match="source"):
        make_backdoor_task(source="code")


def test_make_triggered_queries_leaves_input_alone():
    held = make_ifeval(5, seed=9)
    before = copy.deepcopy(held)
    qs = make_triggered_queries(held, id_prefix="trig")
    assert held == before
    assert [q["id"] for q in qs] == [f"trig-{i:05d}" for i in range(5)]
    assert all(q["prompt"].startswith(f"{DEFAULT_TRIGGER} ") for q in qs)
