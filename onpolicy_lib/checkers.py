"""Task checkers for the generation evaluation: is a completion's answer right?

* GSM8K: lm-eval's ``gsm8k-cot`` extraction (its ``RegexFilter``: the last "the answer is N", else its
  flexible extract, the last number) and its exact match (commas, ``$`` and a trailing period ignored,
  case-insensitive), plus numeric equality ("18.0" is 18).
* MATH: the last ``\\boxed{}`` (lm-eval's ``minerva_math`` ``last_boxed_only_string``/``remove_boxed``),
  normalised as Minerva does (``normalize_final_answer``); correct when lm-eval's sympy ``is_equiv`` or
  math-verify accepts it against the gold answer derived the same way from the reference solution.
  Both use ``SIGALRM`` timeouts: call from the main thread.
* HumanEval / MBPP: pass@1 of one completion. The code is the first fenced block (lm-eval's MBPP
  ``extract_code_blocks`` pattern; an unclosed fence, as a length cap leaves it, runs to the end; no
  fence: the whole completion), run with the task's tests in :mod:`onpolicy_lib.sandbox`, never here
  (where the machine cannot confine it, it is not run and ``correct`` is None).
  lm-eval's own code metric (``evaluate``'s ``code_eval``) fetches its script from the hub and runs
  code in a child of our process, so it is not used.
* Basic skills: the answer line (first non-empty line, a restated question and "The answer is" removed)
  must equal the gold choice (numerically for arithmetic; as a Python syntax tree for code expressions), or
  name the gold choice and none of the dataset's distractors.
"""

from __future__ import annotations

import ast
import functools
import re
import secrets
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from onpolicy_lib.sandbox import SandboxLimits, SandboxUnavailable, run_python


class GenItem(Protocol):
    """What a checker reads of an item (:class:`onpolicy_lib.gen_tasks.GenItem`, which builds its pools
    with these checkers: naming it here would make the two modules import each other)."""

    task: str
    check: dict[str, Any]


@dataclass(frozen=True)
class CheckResult:
    correct: bool | None  # None: no checker for the task
    extracted: str | None  # the answer (or code) taken from the completion; None when none was found
    detail: str


# --------------------------------------------------------------------------
# GSM8K
# --------------------------------------------------------------------------

# lm-eval gsm8k-cot's patterns; "the answer is" in either case (our prompt asks "So the answer is N.").
_GSM8K_STRICT = r"[Tt]he answer is (\-?[0-9\.\,]+)"
_GSM8K_FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
_GSM8K_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]


def _regex_extract(pattern: str, text: str) -> str | None:
    from lm_eval.filters.extraction import RegexFilter

    out = list(RegexFilter(pattern, group_select=-1, fallback="").apply([[text]], [{}]))[0][0]
    return out.rstrip(".,") or None  # the sentence's own full stop is not part of the number


def _number(text: str) -> float | None:
    try:
        return float(re.sub(r"[,$\s]", "", text).rstrip("."))
    except ValueError:
        return None


def _check_gsm8k(item: GenItem, completion: str) -> CheckResult:
    from lm_eval.api.metrics import exact_match_hf_evaluate

    gold = item.check["answer"]
    for _how, pattern in (("strict", _GSM8K_STRICT), ("flexible", _GSM8K_FLEXIBLE)):
        extracted = _regex_extract(pattern, completion)
        if extracted is not None:
            break
    else:
        return CheckResult(False, None, "no number found")
    match = exact_match_hf_evaluate([extracted], [gold], regexes_to_ignore=_GSM8K_IGNORE, ignore_case=True)
    a, b = _number(extracted), _number(gold)
    correct = bool(match["exact_match"]) or (a is not None and b is not None and a == b)
    return CheckResult(correct, extracted, f"{_how} extract vs gold {gold!r}")


# --------------------------------------------------------------------------
# MATH
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _minerva():
    # lm-eval's minerva_math utilities (they need sympy, math-verify and antlr4 4.11: lm-eval[math]).
    from lm_eval.tasks.minerva_math import utils

    return utils


def _boxed(text: str) -> str | None:
    utils = _minerva()
    box = utils.last_boxed_only_string(text)
    if box is None:
        return None
    try:
        return utils.remove_boxed(box)
    except AssertionError:  # "\boxed" without its closing brace
        return None


def math_gold_answer(solution: str) -> str:
    """The normalised final answer of a MATH reference solution (as lm-eval's ``minerva_math`` derives it)."""
    boxed = _boxed(solution)
    return _minerva().normalize_final_answer(boxed) if boxed is not None else ""


def _check_math(item: GenItem, completion: str) -> CheckResult:
    if threading.current_thread() is not threading.main_thread():
        # Elsewhere is_equiv's SIGALRM timeout fails and it silently returns False.
        raise RuntimeError("check: MATH items must be checked in the main thread (lm-eval's is_equiv and "
                           "math-verify time out with SIGALRM)")
    gold = item.check["answer"]
    if not gold:
        return CheckResult(None, None, "reference solution has no boxed answer")
    boxed = _boxed(completion)
    if boxed is None:
        return CheckResult(False, None, "no \\boxed{} answer")
    utils = _minerva()
    answer = utils.normalize_final_answer(boxed)
    if utils.is_equiv(answer, gold):
        return CheckResult(True, answer, f"equivalent to {gold!r} (lm-eval is_equiv)")
    from math_verify import parse, verify

    try:
        ok = bool(verify(parse(f"${gold}$"), parse(f"${boxed}$")))
    except Exception:  # noqa: BLE001 - a parser failure is a wrong answer, not an error
        ok = False
    return CheckResult(ok, answer, f"{'equivalent' if ok else 'not equivalent'} to {gold!r} (math-verify)")


# --------------------------------------------------------------------------
# Code (HumanEval, MBPP)
# --------------------------------------------------------------------------

_FENCE = re.compile(r"```(?:[\w+-]+)?\n?(.*?)\n?```", re.S)


def extract_code(completion: str) -> str:
    """The first fenced code block; an unclosed fence runs to the end; without any fence, the whole text."""
    match = _FENCE.search(completion)
    if match:
        return match.group(1)
    opened = re.search(r"```(?:[\w+-]+)?\n?", completion)
    return completion[opened.end():] if opened else completion


def _run_tests(program: str, timeout: float) -> tuple[bool, str]:
    # A fresh token printed after the last test: a sample that exits early (sys.exit(0)) does not pass.
    token = secrets.token_hex(8)
    result = run_python(f"{program}\n\nprint({token!r})\n", SandboxLimits(wall_s=timeout))
    ok = result.passed and token in result.stdout
    if ok:
        return True, "tests passed"
    if result.timed_out:
        return False, f"timed out after {timeout:g} s"
    last = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
    return False, f"tests failed: {last[:200]}"


def _sandboxed(check_code):
    # Where the machine cannot confine code, the sample is not run and the task has no checker (None).
    @functools.wraps(check_code)
    def run(item: GenItem, completion: str, timeout: float) -> CheckResult:
        try:
            return check_code(item, completion, timeout)
        except SandboxUnavailable as e:
            return CheckResult(None, extract_code(completion), f"not run: {e}")

    return run


@_sandboxed
def _check_humaneval(item: GenItem, completion: str, timeout: float) -> CheckResult:
    code = extract_code(completion)
    prompt, entry = item.check["prompt"], item.check["entry_point"]
    at = re.search(rf"^def\s+{re.escape(entry)}\s*\(", prompt, re.M)
    if re.search(rf"def\s+{re.escape(entry)}\s*\(", code):
        # A whole function: keep the prompt's imports and helpers that precede it.
        program = (prompt[: at.start()] if at else "") + code
    else:
        program = prompt + code  # a body continuing the prompt, as lm-eval's completion format
    ok, detail = _run_tests(f"{program}\n\n{item.check['test']}\n\ncheck({entry})", timeout)
    return CheckResult(ok, code, detail)


@_sandboxed
def _check_mbpp(item: GenItem, completion: str, timeout: float) -> CheckResult:
    code = extract_code(completion)
    tests = "\n".join(item.check["tests"])
    # MBPP's setup code builds test inputs from the solution's own classes (task 367: Node), so it follows the code.
    ok, detail = _run_tests(f"{code}\n\n{item.check.get('setup', '')}\n{tests}", timeout)
    return CheckResult(ok, code, detail)


# --------------------------------------------------------------------------
# Basic skills
# --------------------------------------------------------------------------


def _answer_line(completion: str, question: str) -> str:
    text = re.sub(r"```[\w+-]*", "\n", completion)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    q = question.strip()
    if q and line.lower().startswith(q.lower()):
        line = line[len(q):].strip()
    elif q.endswith("return") and line.startswith("return"):  # the code skill: "return <expression>"
        line = line[len("return"):].strip()
    line = re.sub(r"^(?:so\s+)?(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*[:=]?\s*", "", line, flags=re.I)
    if q.endswith("return") and line.startswith("return "):
        line = line[len("return "):]
    line = line.strip().rstrip(".;").strip().strip("`").strip()
    # Quotes are part of a code expression; elsewhere they only mark the answer.
    return line if q.endswith("return") else line.strip("'\"").strip()


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+|[^\w\s]", text.lower())


def _mentions(line: str, choice: str) -> bool:
    words, target = _words(line), _words(choice)
    n = len(target)
    return n > 0 and any(words[i:i + n] == target for i in range(len(words) - n + 1))


def _same_expression(a: str, b: str) -> bool:
    # Syntax trees ignore spacing and quote style but not the quoted text (' '.join is not ''.join).
    try:
        return ast.dump(ast.parse(a, mode="eval")) == ast.dump(ast.parse(b, mode="eval"))
    except (SyntaxError, ValueError):
        return " ".join(a.split()) == " ".join(b.split())


def _check_basic_skills(item: GenItem, completion: str) -> CheckResult:
    skill, gold, choices = item.check["skill"], item.check["answer"], item.check["choices"]
    line = _answer_line(completion, item.check["question"])
    if not line:
        return CheckResult(False, None, "no answer")
    if skill == "arithmetic":
        numbers = re.findall(r"-?\d+(?:\.\d+)?", line.replace(",", ""))
        if not numbers:
            return CheckResult(False, line, "no number")
        ok = _number(numbers[-1]) == _number(gold)
        return CheckResult(ok, numbers[-1], f"last number vs gold {gold!r}")
    if skill == "coding":
        ok = _same_expression(line, gold)
        return CheckResult(ok, line, f"expression vs gold {gold!r} (compared as Python syntax trees)")
    if _words(line) == _words(gold):
        return CheckResult(True, line, "equals the gold answer")
    others = [c for c in choices if c != gold and not _mentions(gold, c)]
    ok = _mentions(line, gold) and not any(_mentions(line, c) for c in others)
    return CheckResult(ok, line, "names the gold answer only" if ok else f"does not name {gold!r} alone")


# --------------------------------------------------------------------------


def check(item: GenItem, completion: str, timeout: float = 10.0) -> CheckResult:
    """Score one completion of ``item``; ``timeout`` (seconds) bounds a code sample's run."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    if item.task == "gsm8k":
        return _check_gsm8k(item, completion)
    if item.task == "math":
        return _check_math(item, completion)
    if item.task == "humaneval":
        return _check_humaneval(item, completion, timeout)
    if item.task == "mbpp":
        return _check_mbpp(item, completion, timeout)
    if item.task.startswith("basic_skills_"):
        return _check_basic_skills(item, completion)
    return CheckResult(None, None, f"no checker for task {item.task!r}")
