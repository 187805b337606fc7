"""Each checker on hand-made right, wrong and malformed answers."""

from __future__ import annotations

import pytest

from onpolicy_lib import checkers
from onpolicy_lib.checkers import check, extract_code, math_gold_answer
from onpolicy_lib.gen_tasks import GenItem
from onpolicy_lib.sandbox import SandboxUnavailable, isolation


def _item(task: str, check_: dict, reference: str = "") -> GenItem:
    return GenItem(task, f"{task}:x", [{"role": "user", "content": "q"}], reference, check_)


GSM8K = _item("gsm8k", {"answer": "1800"})


@pytest.mark.parametrize("completion, correct, extracted", [
    ("She earns 18 * 100 = 1,800 dollars. So the answer is 1800.", True, "1800"),
    ("So the answer is $1,800.", True, "$1,800"),
    ("The answer is 1800.00", True, "1800.00"),
    ("He has 5 apples and 7 pears, 1800 in all", True, "1800"),  # lm-eval's flexible extract: the last number
    ("First 1800 was a guess, but the total is 1900. So the answer is 1900.", False, "1900"),
    ("So the answer is 18.", False, "18"),
    ("I do not know.", False, None),
    ("", False, None),
])
def test_gsm8k(completion, correct, extracted):
    result = check(GSM8K, completion)
    assert (result.correct, result.extracted) == (correct, extracted), result


MATH_SOLUTION = "So $x = \\frac{1}{2}$, and the answer is $\\boxed{\\frac{1}{2}}$."


def test_math_gold_answer_is_the_normalised_box():
    assert math_gold_answer(MATH_SOLUTION) == "\\frac{1}{2}"
    assert math_gold_answer("no box here") == ""


@pytest.mark.parametrize("completion, correct", [
    ("Hence the value is $\\boxed{\\frac{1}{2}}$.", True),
    ("Dividing, $x = \\boxed{0.5}$.", True),  # equivalent, not identical
    ("$\\boxed{\\dfrac12}$", True),
    ("We get $\\boxed{2}$ first, then correct it to $\\boxed{1/2}$.", True),  # the last box counts
    ("The answer is $\\boxed{\\frac{1}{3}}$.", False),
    ("The answer is 1/2.", False),  # no box: the prompt asks for \boxed{}
    ("$\\boxed{\\frac{1}{2$", False),  # unclosed box
])
def test_math(completion, correct):
    item = _item("math", {"answer": math_gold_answer(MATH_SOLUTION), "solution": MATH_SOLUTION})
    assert check(item, completion).correct is correct


def test_math_intervals_and_tuples():
    gold = _item("math", {"answer": math_gold_answer("$\\boxed{[2,5)}$")})
    assert check(gold, "The domain is $\\boxed{[2,5)}$.").correct
    assert not check(gold, "The domain is $\\boxed{[2,5]}$.").correct


def test_math_refuses_other_threads():
    import concurrent.futures

    item = _item("math", {"answer": "2"})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with pytest.raises(RuntimeError, match="main thread"):
            pool.submit(check, item, "$\\boxed{2}$").result()


def test_extract_code():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # cut at the cap
    assert extract_code("def f():\n    return 1") == "def f():\n    return 1"


HUMANEVAL = _item("humaneval", {
    "prompt": "from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    \"\"\"Sum of xs.\"\"\"\n",
    "test": "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n",
    "entry_point": "total",
})
MBPP = _item("mbpp", {"tests": ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"],
                      "setup": ""})


@pytest.fixture(scope="module")
def sandbox():
    if not (isolation().confines_writes and isolation().cuts_network):
        pytest.skip("the sandbox cannot confine code here")


@pytest.mark.parametrize("completion, correct", [
    ("```python\nfrom typing import List\n\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```", True),
    ("```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```", True),  # the prompt's import is kept
    ("    return sum(xs)\n", True),  # a body continuing the prompt
    ("```python\ndef total(xs):\n    return len(xs)\n```", False),
    ("```python\ndef total(xs):\n    while True:\n        pass\n```", False),  # stopped at the timeout
    ("```python\nimport sys\nsys.exit(0)\n```", False),  # exiting early is not passing
    ("I think you should add the numbers up.", False),  # malformed: prose
])
def test_humaneval(sandbox, completion, correct):
    result = check(HUMANEVAL, completion, timeout=3)
    assert result.correct is correct, result


@pytest.mark.parametrize("completion, correct", [
    ("```python\ndef add(a, b):\n    return a + b\n```", True),
    ("```python\ndef add(a, b):\n    return a - b\n```", False),
    ("```python\ndef add(a, b)\n    return a + b\n```", False),  # syntax error
    ("", False),
])
def test_mbpp(sandbox, completion, correct):
    assert check(MBPP, completion, timeout=3).correct is correct


def _skill(skill: str, question: str, answer: str, choices: list[str]) -> GenItem:
    return _item(f"basic_skills_{skill}", {"skill": skill, "question": question, "answer": answer,
                                           "choices": choices}, answer)


@pytest.mark.parametrize("item, completion, correct", [
    (_skill("arithmetic", "4 * 8 =", "32", ["40", "32", "36"]), "32", True),
    (_skill("arithmetic", "4 * 8 =", "32", ["40", "32", "36"]), "4 * 8 = 32.", True),
    (_skill("arithmetic", "4 * 8 =", "32", ["40", "32", "36"]), "36", False),
    (_skill("arithmetic", "4 * 8 =", "32", ["40", "32", "36"]), "thirty-two", False),
    (_skill("string_operations", "The reverse of 'abcd' is", "dcba", ["abcd", "dcba", "dcab"]), "'dcba'", True),
    (_skill("string_operations", "The reverse of 'abcd' is", "dcba", ["abcd", "dcba", "dcab"]),
     "The reverse of 'abcd' is dcba.", True),
    (_skill("string_operations", "Appending 'end' to 'start' yields", "startend", ["startend", "start", "end"]),
     "start", False),
    (_skill("pattern", "2 4 6 8", "10", ["14", "9", "10", "12"]), "10", True),
    (_skill("pattern", "2 4 6 8", "10", ["14", "9", "10", "12"]), "10 or 12", False),  # names a distractor too
    (_skill("coding", "def add(a, b):\n    return", "a + b", ["a * b", "a + b"]), "return a+b", True),
    (_skill("coding", "def add(a, b):\n    return", "a + b", ["a * b", "a + b"]), "```python\na * b\n```", False),
    (_skill("coding", "def join(lst):\n    return", "' '.join(lst)", ["''.join(lst)", "' '.join(lst)"]),
     "''.join(lst)", False),
    (_skill("common_knowledge", "The number of legs of a cat is", "four", ["five", "two", "four"]),
     "A cat has four legs.", True),
    (_skill("common_knowledge", "The number of legs of a cat is", "four", ["five", "two", "four"]), "two", False),
    (_skill("common_knowledge", "The number of legs of a cat is", "four", ["five", "two", "four"]), "", False),
])
def test_basic_skills(item, completion, correct):
    assert check(item, completion).correct is correct


def test_code_is_not_run_without_a_sandbox(monkeypatch):
    def unavailable(*args, **kwargs):
        raise SandboxUnavailable("sandbox: none here")

    monkeypatch.setattr(checkers, "run_python", unavailable)
    result = check(MBPP, "```python\ndef add(a, b):\n    return a + b\n```")
    assert result.correct is None and "not run" in result.detail


def test_unknown_task_has_no_checker_and_bad_input_is_rejected():
    assert check(_item("squad", {}), "anything").correct is None
    with pytest.raises(TypeError, match="completion"):
        check(GSM8K, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        check(GSM8K, "x", timeout=0)
