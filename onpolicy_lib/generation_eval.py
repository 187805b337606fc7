"""Generation quality of one model on evaluation items: full-length outputs, scored three ways.

For each item (a task, an id, chat ``messages``, a ``reference`` answer and a ``check`` naming its
checker; :class:`onpolicy_lib.gen_tasks.GenItem`, or any object with those attributes) the model's
greedy output and ``samples`` outputs sampled at ``temperature`` (:func:`onpolicy_lib.generation.generate_texts`)
are scored for

* **correctness**: the item's checker (:func:`onpolicy_lib.checkers.check`: final-answer match,
  answer equivalence, tests passed in a sandbox); ``None`` where the item has none;
* **reference overlap**: ROUGE-L F1 against ``reference`` (``rouge-score``'s ``rougeL``, its default
  tokenizer, no stemming), as MiniLLM and GKD report; ``None`` without a reference;
* **teacher plausibility**: the teacher's negative log-likelihood per token of the output, teacher-forced
  on the prompt and the output, averaged over the output's tokens (its end token included);

and its length and whether it hit ``max_new_tokens``. Summaries, per task and overall, weight every
example equally: an example's value is the mean over its samples, and a summary the mean over examples
(``n``: the examples with a value; ``sem``: the standard error of that mean over examples).
:func:`gap_recovered` turns a student's summary into the fraction of the teacher-to-PTQ gap it recovers.
Everything returned is JSON-serialisable (it is written to ``eval.json``).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from onpolicy_lib.batches import DistillCollator
from onpolicy_lib.divergence import token_nll
from onpolicy_lib.fidelity import completion_logits
from onpolicy_lib.generation import Generation, encode_prompts, generate_texts

METRICS = ("correct", "rouge_l", "teacher_nll", "tokens", "hit_cap")
# Metrics whose teacher-to-PTQ gap a student can recover (length and truncation describe, not judge).
QUALITY_METRICS = ("correct", "rouge_l", "teacher_nll")
WEIGHTING = "per example (an example's mean over its samples, then the mean over examples)"
# Computed from each recorded output's text when results are read (so every committed evaluation has them):
# how much an output loops, the failure long generations compound into.
TEXT_METRICS = ("repetition",)
REPETITION_N = 4
# Elements of the teacher's [rows, positions, vocab] logits scored at once: rows per scoring batch
# are cut so a long batch of a large vocabulary stays near 512 MiB of fp32.
SCORE_LOGITS_ELEMENTS = 1 << 27
ITEM_ATTRIBUTES = ("task", "id", "messages", "reference", "check")


def _default_checker() -> Callable[[Any, str], Any]:
    from onpolicy_lib.checkers import check  # imported late: the checkers are optional for this module

    return check


def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def _json_value(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


@torch.no_grad()
def teacher_nll(teacher: torch.nn.Module, pad_token_id: int, prompt_ids: Sequence[Sequence[int]],
                completion_ids: Sequence[Sequence[int]], batch_size: int = 16) -> list[float]:
    """The teacher's mean negative log-likelihood per completion token, teacher-forced on prompt + completion.

    Batched longest first, with rows per batch capped so the logits stay near :data:`SCORE_LOGITS_ELEMENTS`.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError("prompt_ids and completion_ids must have one entry per example")
    collate = DistillCollator(pad_token_id)
    device = next(teacher.parameters()).device
    vocab = teacher.get_output_embeddings().weight.shape[0]
    was_training = teacher.training
    teacher.eval()
    order = sorted(range(len(prompt_ids)), key=lambda i: (-len(prompt_ids[i]) - len(completion_ids[i]), i))
    out: list[float] = [math.nan] * len(prompt_ids)
    start = 0
    try:
        while start < len(order):
            first = order[start]
            width = len(prompt_ids[first]) + len(completion_ids[first]) + 1
            rows = max(1, min(batch_size, SCORE_LOGITS_ELEMENTS // (width * vocab)))
            indices = order[start:start + rows]
            for i in indices:
                if not completion_ids[i]:
                    raise ValueError(f"completion {i} is empty: there is nothing to score")
            batch = collate([{"prompt_ids": prompt_ids[i], "completion_ids": completion_ids[i]} for i in indices])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits, mask = completion_logits(teacher, batch)
            targets = F.pad(batch["input_ids"][:, batch["prompt_ids"].shape[1]:], (0, 1), value=0)
            nll = token_nll(logits, targets)[:, :-1]
            means = (nll * mask).sum(-1) / mask.sum(-1)
            for i, value in zip(indices, means.tolist(), strict=True):
                out[i] = value
            start += rows
    finally:
        teacher.train(was_training)
    return out


def repetition(text: str, n: int = REPETITION_N) -> float | None:
    """The share of an output's word ``n``-grams that repeat an earlier one in the same output (seq-rep-n,
    Welleck et al. 2019): 0 without repeats, near 1 for a loop; None for an output under ``n`` + 1 words."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 2:
        return None
    return 1.0 - len(set(grams)) / len(grams)


def _summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-example means over samples, then mean, count and standard error over examples, per metric."""
    by_example: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:
        by_example.setdefault((record["task"], record["id"]), []).append(record)
    out: dict[str, Any] = {"examples": len(by_example)}
    for metric in METRICS:
        values = []
        for group in by_example.values():
            found = [float(r[metric]) for r in group if r[metric] is not None]
            if found:
                values.append(sum(found) / len(found))
        out[metric] = {"mean": statistics.fmean(values) if values else None, "n": len(values),
                       "sem": statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None}
    return out


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Overall and per-task summaries of per-example records (see the module for the weighting)."""
    tasks = sorted({r["task"] for r in records})
    return {"all": _summary(records), "by_task": {t: _summary([r for r in records if r["task"] == t]) for t in tasks},
            "weighting": WEIGHTING}


def evaluate_generation(model: torch.nn.Module, tokenizer: Any, items: Sequence[Any], *,
                        teacher: torch.nn.Module | None, max_new_tokens: int, temperature: float, samples: int = 1,
                        seed: int = 0, batch_size: int = 16,
                        check_fn: Callable[[Any, str], Any] | None = None,
                        eos_token_ids: Sequence[int] | None = None, matmul: str = "linear") -> dict[str, Any]:
    """Greedy output and ``samples`` samples at ``temperature`` of ``model`` on ``items``, scored (see the module).
    ``matmul``: the decode steps' products (:func:`onpolicy_lib.generation.generate_texts`).

    ``teacher``: scores the teacher NLL (None leaves it out; pass the teacher itself to score its own
    outputs). ``check_fn(item, completion)`` returns an object with ``correct`` (bool or None),
    ``extracted`` and ``detail`` (default :func:`onpolicy_lib.checkers.check`). ``seed``: the sampling
    seed; every model evaluated on the same items with the same seed draws from the same per-prompt
    random streams. Returns ``{"settings", "greedy", "sampled"}``, each mode with ``summary``
    (:func:`summarize`) and ``per_example`` records in the items' order (samples after one another).
    """
    items = list(items)
    if not items:
        raise ValueError("items is empty: nothing to evaluate")
    for i, item in enumerate(items):
        missing = [a for a in ITEM_ATTRIBUTES if not hasattr(item, a)]
        if missing:
            raise ValueError(f"items[{i}] lacks {', '.join(missing)}: an item needs {', '.join(ITEM_ATTRIBUTES)}")
    keys = [(str(item.task), str(item.id)) for item in items]
    if len(set(keys)) != len(keys):
        raise ValueError("items must have distinct (task, id) pairs")
    position = {key: k for k, key in enumerate(keys)}
    if not isinstance(samples, int) or samples < 0:
        raise ValueError(f"samples must be an integer >= 0; got {samples!r}")
    if samples and not temperature > 0:
        raise ValueError(f"temperature must be > 0 to draw samples; got {temperature!r} (samples=0 for greedy only)")
    check_fn = check_fn or _default_checker()
    scorer = _rouge_scorer()
    prompts = encode_prompts(tokenizer, [item.messages for item in items])
    seconds: dict[str, float] = {}

    def run(mode: str, generations: list[Generation], sample_of: list[int | None]) -> dict[str, Any]:
        n = len(items)
        start = time.perf_counter()
        nll = (teacher_nll(teacher, tokenizer.pad_token_id, [prompts[k % n] for k in range(len(generations))],
                           [g.token_ids for g in generations], batch_size)
               if teacher is not None else [None] * len(generations))
        seconds[f"{mode}_teacher_nll"] = time.perf_counter() - start
        start = time.perf_counter()
        records = []
        for k, (generation, sample) in enumerate(zip(generations, sample_of, strict=True)):
            item = items[k % n]
            result = check_fn(item, generation.text)
            reference = item.reference
            rouge = (scorer.score(reference, generation.text)["rougeL"].fmeasure
                     if isinstance(reference, str) and reference.strip() else None)
            correct = getattr(result, "correct", None)
            records.append({"task": str(item.task), "id": str(item.id), **({"sample": sample} if sample is not None
                                                                           else {}),
                            "completion": generation.text, "tokens": len(generation.token_ids),
                            "hit_cap": generation.hit_cap, "prompt_tokens": generation.prompt_tokens,
                            "correct": None if correct is None else bool(correct),
                            "extracted": _json_value(getattr(result, "extracted", None)),
                            "detail": _json_value(getattr(result, "detail", None)),
                            "rouge_l": rouge, "teacher_nll": nll[k]})
        seconds[f"{mode}_check"] = time.perf_counter() - start
        # Items' order, samples after one another.
        records.sort(key=lambda r: (position[r["task"], r["id"]], r.get("sample", 0)))
        return {"summary": summarize(records), "per_example": records}

    out: dict[str, Any] = {"settings": {"max_new_tokens": max_new_tokens, "temperature": temperature,
                                        "samples": samples, "seed": seed, "batch_size": batch_size,
                                        **({"matmul": matmul} if matmul != "linear" else {}),
                                        "items": len(items), "weighting": WEIGHTING,
                                        "rouge": "rouge-score rougeL F1, default tokenizer, no stemming",
                                        "teacher_nll": "mean per output token (end token included), teacher-forced "
                                                       "on prompt + output" if teacher is not None else None}}
    start = time.perf_counter()
    greedy = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                            batch_size=batch_size, eos_token_ids=eos_token_ids, matmul=matmul)
    seconds["greedy_generate"] = time.perf_counter() - start
    out["greedy"] = run("greedy", greedy, [None] * len(items))
    if samples:
        # All samples in one call: a prompt's samples have similar lengths, so they batch together; prompt
        # k of sample s is input row s * len(items) + k, with its own generator (generation.row_seed).
        start = time.perf_counter()
        sampled = generate_texts(model, tokenizer, prompts * samples, max_new_tokens=max_new_tokens,
                                 temperature=temperature, seed=seed, batch_size=batch_size,
                                 eos_token_ids=eos_token_ids, matmul=matmul)
        seconds["sampled_generate"] = time.perf_counter() - start
        out["sampled"] = run("sampled", sampled, [k // len(items) for k in range(len(sampled))])
    out["seconds"] = seconds
    return out


def gap_recovered(student: float | None, ptq: float | None, teacher: float | None) -> float | None:
    """The fraction of the teacher-to-PTQ gap ``student`` recovers: ``(student - ptq) / (teacher - ptq)``.

    1: the student matches the teacher; 0: no better than PTQ; below 0: worse than PTQ; above 1: past
    the teacher. The direction comes from the gap itself, so it reads the same for metrics where higher
    is better (ROUGE-L, correctness) and lower is better (teacher NLL). None where any value is missing
    or not finite, or the gap is 0 (nothing to recover).
    """
    values = (student, ptq, teacher)
    if any(v is None or not math.isfinite(v) for v in values):
        return None
    gap = teacher - ptq
    return None if gap == 0 else (student - ptq) / gap


def gaps_recovered(student: dict[str, Any], ptq: dict[str, Any], teacher: dict[str, Any],
                   mode: str = "greedy") -> dict[str, Any]:
    """:func:`gap_recovered` of every quality metric's mean, overall and per task, from three
    :func:`evaluate_generation` results (a task missing from one of them is left out)."""
    summaries = [r[mode]["summary"] for r in (student, ptq, teacher)]

    def fractions(parts: list[dict[str, Any]]) -> dict[str, float | None]:
        return {m: gap_recovered(*(p[m]["mean"] for p in parts)) for m in QUALITY_METRICS}

    tasks = set.intersection(*(set(s["by_task"]) for s in summaries))
    return {"all": fractions([s["all"] for s in summaries]),
            "by_task": {t: fractions([s["by_task"][t] for s in summaries]) for t in sorted(tasks)}}


def summary_table(results: dict[str, dict[str, Any]], mode: str = "greedy") -> Any:
    """A table of :func:`evaluate_generation` results by model (``{label: result}``): per task and overall,
    each metric's mean over examples with its standard error and ``n``, one row per (model, task)."""
    import pandas as pd

    rows = []
    for label, result in results.items():
        if not result or mode not in result:
            continue
        summary = result[mode]["summary"]
        for task, parts in [("all", summary["all"]), *summary["by_task"].items()]:
            row: dict[str, Any] = {"model": label, "task": task, "examples": parts["examples"]}
            for metric in METRICS:
                row[metric] = parts[metric]["mean"]
                row[f"{metric} sem"] = parts[metric]["sem"]
            rows.append(row)
    return pd.DataFrame(rows)
