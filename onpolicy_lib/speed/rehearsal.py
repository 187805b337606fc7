"""``python -m onpolicy_lib.speed.rehearsal``: the original study's preset at Qwen3-4B's size on one device.

A dress rehearsal before GPUs are spent on the study: the preset ``params/qwen3_4b_study.yaml`` (LoRA
r=32, INT4 group 128 on the device's int4 packing, bf16 with fp32 master weights, 4 x 1024-token batches,
128 new tokens) on ``random:Qwen/Qwen3-4B-Instruct-2507`` (Qwen3-4B-Instruct-2507's architecture with
random weights: a step, a rollout and an evaluation cost what its shapes cost, whatever the values). It
times, each in its own section so that one failure is recorded and the rest still run:

* our step at λ=0 and at λ=1 (the speed benchmark's driver, :mod:`onpolicy_lib.speed.contenders`), and
  from them the optimizer step of the preset's accumulation, rollout tokens/s and peak device memory;
* stock TRL ``GKDTrainer``'s λ=1 step on the same batch and settings;
* the teacher's and a converted INT4 student's lm-eval log-likelihood throughput (documents/s, on
  synthetic documents of the five benchmarks' request shapes, :data:`DOCUMENT_SHAPES`), forward
  throughput and generation throughput;
* the checks still pending on a GPU: span-only lm-eval scoring against stock lm-eval, span-only
  perplexity logits against full logits, length-ordered fidelity batches against held-out order, a run
  evaluated in both evaluation dtypes, ``export_student`` reloaded by transformers alone, and compiled
  rollouts (or the refusal they meet);

then estimates the GPU-hours of every ``qwen_*`` sweep from those figures (:func:`study_cost`) and writes
a text and a JSON report (never over an existing one). Batches are synthesised to the preset's lengths
from real chats (their token ids repeated), since the offline chats are far shorter than tulu-3's long
ones and would understate the cost. ``--shape tiny`` runs the same sections on a two-layer Qwen3 at tiny
lengths (the CPU test). A global time budget stops it cleanly: sections that no longer fit are skipped
and the report says so. See ``docs/gpu-rehearsal.md`` for how to run it on a lent GPU.

    python -m onpolicy_lib.speed.rehearsal --make-bundle .rehearsal      # here: tokenizer + chats to carry
    python -m onpolicy_lib.speed.rehearsal --bundle .rehearsal           # there: the rehearsal
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

PRESET = "qwen3_4b_study"
MODEL_NAME = "random:Qwen/Qwen3-4B-Instruct-2507"
DEFAULT_OUT = "outputs/gpu_check"
DEFAULT_BUDGET_S = 480.0  # fits one 10-minute device command with start-up and transfers to spare
BUNDLE_CHATS = "chats.jsonl"
BUNDLE_TOKENIZER = "tokenizer"

# A two-layer Qwen3 of the same family (q/k norms, grouped-query attention, tied head) and lengths a CPU
# runs in seconds; the vocabulary is the tokenizer's.
SHAPES: dict[str, dict[str, dict[str, Any]]] = {
    "full": {"model": {}, "train": {}},
    "tiny": {"model": dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32, max_position_embeddings=1024),
             "train": dict(per_device_train_batch_size=2, max_length=64, max_new_tokens=8, min_new_tokens=4)},
}

# The five benchmarks' request structure as lm-eval builds it zero-shot: whether a document's choices share
# one context (scored in one forward when their continuations are one token, as MMLU's letters) or each
# has its own (WinoGrande's partial evaluation). Their lengths and choice counts are measured
# (``reference/benchmark_request_lengths.json``, :func:`benchmark_request_lengths`).
DOCUMENT_SHAPES: dict[str, dict[str, Any]] = {
    "hellaswag": {"shared_context": True}, "arc_easy": {"shared_context": True},
    "arc_challenge": {"shared_context": True}, "winogrande": {"shared_context": False},
    "mmlu": {"shared_context": True},
}
# Documents in the splits the preset's evaluation scores (lm-eval's stock hub tasks, full splits: the
# table in onpolicy_lib.benchmarks; ARC is scored on its test split on the hub).
FULL_SPLITS = {"hellaswag": 10042, "arc_easy": 2376, "arc_challenge": 1172, "winogrande": 1267, "mmlu": 14042}


# ---------------------------------------------------------------------------- settings
@dataclass
class RehearsalSettings:
    shape: str = "full"
    device: str = "auto"
    out: str = DEFAULT_OUT
    bundle: str | None = None  # tokenizer + chats (--make-bundle); None: the offline assets
    budget_s: float = DEFAULT_BUDGET_S
    steps: int = 2  # timed steps of ours (after warmup)
    warmup: int = 1
    trl_steps: int = 1  # timed steps of stock TRL (after one warm-up)
    prompt_tokens: int | None = None  # of each row's max_length; None: half of it
    eval_docs: int = 16  # synthetic documents per benchmark for the throughput figures
    generation_rows: int = 8  # rows of the generation-throughput batch (the fidelity evaluation's batches)
    skip: list[str] = field(default_factory=list)  # section names not to run

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"--shape must be one of {', '.join(SHAPES)}; got {self.shape!r}")
        unknown = sorted(set(self.skip) - set(SECTIONS))
        if unknown:
            raise ValueError(f"--skip: unknown sections {', '.join(unknown)}; sections: {', '.join(SECTIONS)}")
        if self.budget_s <= 0 or self.steps < 1 or self.warmup < 0 or self.trl_steps < 1 or self.eval_docs < 1:
            raise ValueError("--budget-s, --steps, --trl-steps and --eval-docs must be positive, --warmup >= 0")


SECTIONS = ("setup", "step_lambda0", "step_lambda1", "trl_lambda1", "eval_teacher", "eval_student",
            "check_span_scoring", "check_span_perplexity", "check_fidelity_order", "check_run_eval_export",
            "check_compiled_rollouts")


# ---------------------------------------------------------------------------- the bundle
def make_bundle(out: str | Path, chats: int = 64) -> Path:
    """What the rehearsal reads, small enough to carry to a device: the packaged tokenizer (its 49k ids fit
    Qwen3's 151,936-token vocabulary) and the offline mixture's first training and held-out chats."""
    from onpolicy_lib import data
    from onpolicy_lib.assets import PACKAGED_MODEL
    from onpolicy_lib.models import load_tokenizer

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--make-bundle {out}: exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    load_tokenizer(PACKAGED_MODEL).save_pretrained(out / BUNDLE_TOKENIZER)
    train, heldout = data.load_chat_dataset(data.OFFLINE_MIXTURE)
    with (out / BUNDLE_CHATS).open("w") as f:
        for rows in (train.select(range(min(chats, len(train)))), heldout.select(range(min(chats, len(heldout))))):
            for row in rows:
                f.write(json.dumps({k: row[k] for k in ("messages", "source", "id")}) + "\n")
    return out


def _inputs(s: RehearsalSettings) -> tuple[Any, str]:
    """The tokenizer and the dataset name (a chats file) the rehearsal uses."""
    from onpolicy_lib import data
    from onpolicy_lib.assets import PACKAGED_MODEL
    from onpolicy_lib.models import load_tokenizer

    if s.bundle is None:
        return load_tokenizer(PACKAGED_MODEL), data.OFFLINE_MIXTURE
    from transformers import AutoTokenizer

    bundle = Path(s.bundle)
    if not (bundle / BUNDLE_CHATS).is_file():
        raise FileNotFoundError(f"--bundle {bundle}: no {BUNDLE_CHATS} (make one with --make-bundle)")
    tokenizer = AutoTokenizer.from_pretrained(bundle / BUNDLE_TOKENIZER)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, str(bundle / BUNDLE_CHATS)


def train_config(s: RehearsalSettings, dataset_name: str, device: torch.device) -> Any:
    """The preset's TrainConfig at the rehearsal's shape, on the stand-in model and the bundle's chats."""
    from onpolicy_lib.config import TrainConfig, load_preset

    values = {**load_preset(PRESET), **SHAPES[s.shape]["train"], "model_name": MODEL_NAME,
              "dataset_name": dataset_name, "device": str(device)}
    return TrainConfig.from_dict(values)


def build_teacher(s: RehearsalSettings, tokenizer: Any, device: torch.device, dtype: torch.dtype) -> Any:
    from onpolicy_lib.models import build_random_model

    overrides = dict(SHAPES[s.shape]["model"])
    if overrides:  # the tiny shape's vocabulary and special ids are its tokenizer's
        overrides.update(vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = build_random_model(MODEL_NAME, device, dtype, **overrides)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer's {len(tokenizer)} ids do not fit the model's {model.config.vocab_size}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval().requires_grad_(False)


def _fill(ids: list[int], length: int, from_end: bool = False) -> list[int]:
    repeated = ids * math.ceil(length / max(len(ids), 1))
    return repeated[-length:] if from_end else repeated[:length]


def synthesised_batch(tokenizer: Any, dataset_name: str, rows: int, prompt_tokens: int,
                      completion_tokens: int) -> tuple[list[dict[str, list[int]]], list[dict[str, Any]]]:
    """``rows`` real chats with their token ids repeated to exactly ``prompt_tokens`` + ``completion_tokens``
    (a prompt keeps its end, the generation prompt; a completion its start), and the chats themselves."""
    from onpolicy_lib.speed.contenders import fixed_batch

    features, chats = fixed_batch(tokenizer, dataset_name, rows, 2**20, 1)  # any length: filled below
    return [{"prompt_ids": _fill(f["prompt_ids"], prompt_tokens, from_end=True),
             "completion_ids": _fill(f["completion_ids"], completion_tokens)} for f in features], chats


# ---------------------------------------------------------------------------- sections
class Sections:
    """Runs named sections under one time budget; each one's status, seconds, peak memory and error."""

    def __init__(self, budget_s: float, device: torch.device, skip: list[str]) -> None:
        self.start, self.budget_s, self.device, self.skip = time.perf_counter(), budget_s, device, set(skip)
        self.record: dict[str, dict[str, Any]] = {}

    def remaining(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def run(self, name: str, fn: Callable[[], Any], needs_s: float = 0.0) -> Any:
        """``fn()``'s value, or None when it failed or was skipped. A dict value with ``passed`` False
        marks the section failed (a check that ran and disagreed)."""
        if name in self.skip:
            self.record[name] = {"status": "skipped", "reason": "--skip"}
            return None
        if self.remaining() < needs_s:
            self.record[name] = {"status": "skipped",
                                 "reason": f"time budget: {self.remaining():.0f} s left, needs about {needs_s:.0f} s"}
            return None
        print(f"[rehearsal] {name} ({self.remaining():.0f} s of the budget left) ...", file=sys.stderr, flush=True)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        entry: dict[str, Any] = {}
        value = None
        try:
            value = fn()
            passed = not (isinstance(value, dict) and value.get("passed") is False)
            entry["status"] = "passed" if passed else "failed"
        except Exception as err:  # one failing section is recorded; the others still run
            entry.update(status="failed", error=f"{type(err).__name__}: {err}"[:2000],
                         traceback=traceback.format_exc(limit=6)[-3000:])
        entry["seconds"] = round(time.perf_counter() - start, 2)
        if self.device.type == "cuda":
            entry["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20)
        self.record[name] = entry
        print(f"[rehearsal] {name}: {entry['status']} in {entry['seconds']:.1f} s"
              + (f" ({entry['error'].splitlines()[0]})" if "error" in entry else ""), file=sys.stderr, flush=True)
        from onpolicy_lib.speed.timing import release

        release()
        return value


def _student(teacher: Any, cfg: Any, group_size: int, device: torch.device) -> Any:
    from onpolicy_lib.student import build_student

    torch.manual_seed(cfg.seed)  # every contender starts from the same adapters
    return build_student(teacher, cfg.quant_type, group_size, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                         train_embeddings=cfg.train_embeddings, quantize_head=cfg.quantize_head).to(device)


def step_figures(timing: Any, cfg: Any, rollout_tokens: int | None) -> dict[str, Any]:
    """A timed step as the report keeps it: medians, the optimizer step of the preset's accumulation."""
    parts = timing.as_dict()["parts_median_s"]
    micro, optimizer = parts["training_step"], parts["optimizer"]
    figures = {"step_s": timing.median, "seconds": timing.seconds, "micro_step_s": micro, "optimizer_s": optimizer,
               "accumulation": cfg.gradient_accumulation_steps,
               "optimizer_step_s": cfg.gradient_accumulation_steps * micro + optimizer,
               "rollout_s": parts.get("rollout"), "scored_tokens": parts.get("scored_tokens"),
               "peak_mb": timing.peak_mb}
    if rollout_tokens and parts.get("rollout"):
        figures["rollout_tokens_per_s"] = rollout_tokens / parts["rollout"]
    return figures


def _synthetic_requests(tokenizer: Any, shapes: dict[str, dict[str, Any]], docs: int,
                        seed: int = 0) -> dict[str, list[tuple[tuple[str, str], list[int], list[int]]]]:
    """lm-eval ``_loglikelihood_tokens`` requests per benchmark: ``docs`` documents of each shape, token ids
    drawn from the tokenizer's ordinary ids (their values do not change the cost)."""
    generator = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(min(len(tokenizer), 50_000)) if i not in special])

    def ids(n: int) -> list[int]:
        return ordinary[torch.randint(len(ordinary), (n,), generator=generator)].tolist()

    requests = {}
    for task, shape in shapes.items():
        context_len, continuation_len = shape["lengths"]
        rows = []
        for d in range(docs):
            shared = ids(context_len)
            for c in range(shape["choices"]):
                context = shared if shape["shared_context"] else ids(context_len)
                rows.append(((f"{task}:{d}", f"{c}"), context, ids(continuation_len)))
        requests[task] = rows
    return requests


PROFILE_FILE = "benchmark_request_lengths.json"


def benchmark_request_lengths(tokenizer: Any, tokenizer_name: str, docs: int = 200, mmlu_docs_per_subject: int = 4,
                              root: Path | None = None) -> dict[str, Any]:
    """The five benchmarks' zero-shot lm-eval requests in ``tokenizer``'s tokens: per task, the mean, median
    and longest context and continuation over the first ``docs`` documents of the evaluated split (MMLU:
    the first ``mmlu_docs_per_subject`` of each subject), and the median choices per document, built by
    lm-eval from the packaged data.

    What ``reference/benchmark_request_lengths.json`` holds (``--write-benchmark-profile``)."""
    import statistics

    from lm_eval.tasks import get_task_dict

    from onpolicy_lib import benchmarks

    tasks = list(DOCUMENT_SHAPES)
    manager = benchmarks.offline_task_manager(root, tasks)
    built = get_task_dict(benchmarks.leaf_tasks(tasks), manager)
    out: dict[str, Any] = {}
    for task in tasks:
        leaves = [n for n in built if n == task or (task == "mmlu" and n.startswith("mmlu_"))]
        contexts, continuations, choices = [], [], []
        for leaf in sorted(leaves):
            built[leaf].build_all_requests(limit=mmlu_docs_per_subject if task == "mmlu" else docs, rank=0,
                                           world_size=1)
            by_doc: dict[int, list[Any]] = {}
            for instance in built[leaf].instances:
                by_doc.setdefault(instance.doc_id, []).append(instance.args)
            for requests in by_doc.values():
                choices.append(len(requests))
                contexts += [len(tokenizer(c)["input_ids"]) for c, _ in requests]
                continuations += [len(tokenizer(x, add_special_tokens=False)["input_ids"]) for _, x in requests]
        out[task] = {"documents": len(choices), "choices_median": statistics.median(choices),
                     **{f"{kind}_tokens_{stat}": round(fn(values), 2) for kind, values in
                        (("context", contexts), ("continuation", continuations))
                        for stat, fn in (("mean", statistics.mean), ("median", statistics.median), ("max", max))}}
    return {"tokenizer": tokenizer_name, "lm_eval": benchmarks.lm_eval_version(), "docs": docs,
            "mmlu_docs_per_subject": mmlu_docs_per_subject,
            "how": " ".join(benchmark_request_lengths.__doc__.split("\n\n")[0].split()), "tasks": out}


def document_shapes() -> dict[str, dict[str, Any]]:
    """:data:`DOCUMENT_SHAPES` with the committed profile's choices and mean token lengths (the mean, not the
    median: a benchmark's cost is its documents' summed lengths)."""
    from importlib.resources import files

    profile = json.loads(files("onpolicy_lib.reference").joinpath(PROFILE_FILE).read_text())["tasks"]
    return {task: {**shape, "choices": round(profile[task]["choices_median"]),
                   "lengths": (max(1, round(profile[task]["context_tokens_mean"])),
                               max(1, round(profile[task]["continuation_tokens_mean"]))),
                   "source": PROFILE_FILE}
            for task, shape in DOCUMENT_SHAPES.items()}


def evaluation_throughput(model: Any, tokenizer: Any, device: torch.device, s: RehearsalSettings,
                          max_new_tokens: int, batch_size: int) -> dict[str, Any]:
    """lm-eval log-likelihood documents/s per benchmark (the span-only scorer, the evaluation's batch size),
    forward tokens/s, and generation tokens/s of ``generation_rows`` rows of ``max_new_tokens``."""
    from onpolicy_lib.benchmarks import continuation_scorer
    from onpolicy_lib.speed.evaluation import forward_throughput
    from onpolicy_lib.speed.timing import sync

    shapes = document_shapes()
    requests = _synthetic_requests(tokenizer, shapes, s.eval_docs)
    lm = continuation_scorer()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    lm._loglikelihood_tokens(requests["arc_easy"][:8], disable_tqdm=True)  # warm-up
    out: dict[str, Any] = {"loglikelihood": {}, "batch_size": batch_size}
    for task, rows in requests.items():
        sync(device)
        start = time.perf_counter()
        lm._loglikelihood_tokens(rows, disable_tqdm=True)
        sync(device)
        seconds = time.perf_counter() - start
        out["loglikelihood"][task] = {"docs": s.eval_docs, "requests": len(rows), "seconds": seconds,
                                      "docs_per_s": s.eval_docs / seconds, "lengths": list(shapes[task]["lengths"]),
                                      "choices": shapes[task]["choices"], "lengths_source": shapes[task]["source"]}
    out["forward_tokens_per_s"] = forward_throughput(model, device)
    prompt = torch.tensor(_synthetic_requests(tokenizer, {"p": {"choices": 1, "shared_context": True,
                                                                "lengths": (96, 1)}}, s.generation_rows)["p"][0][1])
    prompts = torch.stack([torch.roll(prompt, i) for i in range(s.generation_rows)]).to(device)
    mask = torch.ones_like(prompts)
    kwargs = dict(attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                  do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        model.generate(prompts, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        sync(device)
        start = time.perf_counter()
        model.generate(prompts, **kwargs)
        sync(device)
    seconds = time.perf_counter() - start
    out["generation"] = {"rows": s.generation_rows, "prompt_tokens": prompts.shape[1], "new_tokens": max_new_tokens,
                         "seconds": seconds, "tokens_per_s": s.generation_rows * max_new_tokens / seconds}
    return out


# ---------------------------------------------------------------------------- the pending checks
def check_span_scoring(model: Any, tokenizer: Any, s: RehearsalSettings, batch_size: int) -> dict[str, Any]:
    """The span-only scorer against stock lm-eval ``HFLM`` on the same requests, on this device."""
    from lm_eval.models.huggingface import HFLM

    from onpolicy_lib.benchmarks import continuation_scorer

    requests = [r for rows in _synthetic_requests(tokenizer, document_shapes(), 2, seed=1).values() for r in rows]
    stock = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)._loglikelihood_tokens(
        requests, disable_tqdm=True)
    ours = continuation_scorer()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)._loglikelihood_tokens(
        requests, disable_tqdm=True)
    gap = max(abs(a - b) / max(1.0, abs(b)) for (a, _), (b, _) in zip(ours, stock, strict=True))
    greedy = sum(a == b for (_, a), (_, b) in zip(ours, stock, strict=True)) / len(requests)
    # In bf16 the two compute the head on different row counts, so sums may differ by rounding.
    tolerance = 2e-2 if next(model.parameters()).dtype == torch.bfloat16 else 1e-4
    return {"requests": len(requests), "max_relative_gap": gap, "greedy_agreement": greedy, "tolerance": tolerance,
            "passed": gap <= tolerance and greedy >= 0.95}


class _FullLogits(torch.nn.Module):
    """A model whose forward ignores ``logits_to_keep`` and returns every position's logits, sliced after."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.inner = model

    def forward(self, input_ids: torch.Tensor, logits_to_keep: int = 0, **kwargs: Any) -> Any:
        out = self.inner(input_ids=input_ids, **kwargs)
        if logits_to_keep:
            out.logits = out.logits[:, -logits_to_keep:]
        return out


def check_span_perplexity(model: Any, tokenizer: Any, window: int) -> dict[str, Any]:
    """Sliding-window perplexity from the scored positions' logits only, against full logits, on this device."""
    from onpolicy_lib.perplexity import sliding_window_perplexity

    ids = _synthetic_requests(tokenizer, {"t": {"choices": 1, "shared_context": True, "lengths": (2 * window, 1)}},
                              1, seed=2)["t"][0][1]
    text = tokenizer.decode(ids)
    kwargs = dict(max_length=window, stride=window // 2, max_tokens=2 * window)
    span = sliding_window_perplexity(model, tokenizer, text, **kwargs)
    full = sliding_window_perplexity(_FullLogits(model), tokenizer, text, **kwargs)
    gap = abs(span["nll_per_token"] - full["nll_per_token"]) / abs(full["nll_per_token"])
    tolerance = 1e-2 if next(model.parameters()).dtype == torch.bfloat16 else 1e-5
    return {"tokens_scored": span["tokens_scored"], "window": window, "nll_span": span["nll_per_token"],
            "nll_full": full["nll_per_token"], "relative_gap": gap, "tolerance": tolerance,
            "passed": gap <= tolerance and span["tokens_scored"] == full["tokens_scored"]}


def check_fidelity_order(teacher: Any, student: Any, tokenizer: Any, dataset_name: str, cfg: Any) -> dict[str, Any]:
    """Length-ordered fidelity batches score each example as the held-out order does (teacher-forced)."""
    from onpolicy_lib import data
    from onpolicy_lib.fidelity import FidelityConfig, measure_fidelity

    _, heldout = data.load_chat_dataset(dataset_name)
    # Real held-out chats at their own lengths (at least 256 tokens allowed: the tiny shape's max_length is
    # shorter than most chats), so that the two orders really batch them differently.
    rows, _ = data.tokenize_for_distillation(heldout.select(range(min(16, len(heldout)))), tokenizer,
                                             max(cfg.max_length, 256), 1)
    rows = rows.select(range(min(8, len(rows))))
    if len(rows) < 2:
        raise ValueError(f"{dataset_name}: fewer than 2 held-out chats fit {max(cfg.max_length, 256)} tokens")
    got = {order: measure_fidelity(teacher, student, tokenizer, rows,
                                   FidelityConfig(samples=len(rows), batch_size=4, max_new_tokens=4,
                                                  batch_order=order))
           for order in ("length", "rows")}
    a, b = ([e["forward_kl"] for e in got[o]["per_example"]] for o in ("length", "rows"))
    gap = max(abs(x - y) / max(abs(y), 1e-3) for x, y in zip(a, b, strict=True))
    tolerance = 5e-2 if next(teacher.parameters()).dtype == torch.bfloat16 else 1e-4
    same_ids = [e["id"] for e in got["length"]["per_example"]] == [e["id"] for e in got["rows"]["per_example"]]
    return {"examples": len(rows), "max_relative_gap_forward_kl": gap, "tolerance": tolerance,
            "passed": same_ids and gap <= tolerance}


_RELOAD = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map=sys.argv[2], dtype=getattr(torch, sys.argv[5]))
ids = torch.tensor(json.loads(sys.argv[3]), device=sys.argv[2])
with torch.no_grad():
    logits = model(ids).logits.float()
assert not any(name.startswith("onpolicy_lib") for name in sys.modules), "the library was imported"
torch.save(logits.cpu(), sys.argv[4])
"""


def check_run_eval_export(tokenizer: Any, dataset_name: str, device: torch.device, work: Path) -> dict[str, Any]:
    """A tiny run of the preset's scheme trained on this device, evaluated in each evaluation dtype (teacher,
    PTQ and student, fidelity on 4 chats), exported, and reloaded in a fresh process by transformers alone."""
    from onpolicy_lib.config import EvalConfig, TrainConfig
    from onpolicy_lib.evaluate import evaluate_runs
    from onpolicy_lib.student import export_student, load_student
    from onpolicy_lib.training import train

    model_dir = work / "tiny-teacher"
    build_teacher(RehearsalSettings(shape="tiny"), tokenizer, torch.device("cpu"), torch.float32).save_pretrained(
        model_dir)
    tokenizer.save_pretrained(model_dir)
    cfg = TrainConfig(model_name=str(model_dir), dataset_name=dataset_name, group_size=32, quantize_head=True,
                      lora_r=8, lora_alpha=16, lmbda=1.0, beta=1.0, max_steps=2, max_length=96, max_new_tokens=4,
                      min_new_tokens=2, min_completion_tokens=1, heldout_eval_size=4, eval_steps=None, save_steps=100,
                      output_dir=str(work / "run"), device=str(device))
    run = train(cfg)
    result: dict[str, Any] = {"dtypes": {}}
    for dtype in ("float32", "bfloat16"):  # each on its own: one dtype's failure leaves the other and the export
        try:
            table = evaluate_runs(EvalConfig(run_dirs=[str(run.path)], tasks=[], perplexity_tokens=0,
                                             generation_tasks=[], fidelity_samples=4,
                                             cache_dir=str(work / f"cache-{dtype}"), device=str(device), dtype=dtype))
            record = run.require_evaluation()
            finite = bool(table["forward_kl"].dropna().map(math.isfinite).all())
            result["dtypes"][dtype] = {"recorded": record["config"].get("dtype"), "rows": len(table),
                                       "forward_kl_finite": finite, "passed": record["config"].get("dtype") == dtype
                                       and finite}
        except Exception as err:
            result["dtypes"][dtype] = {"error": f"{type(err).__name__}: {err}"[:500], "passed": False}
    exported = export_student(run.path, work / "export", device=str(device))
    ids = torch.randint(4, min(len(tokenizer), 200), (2, 16)).tolist()
    target = work / "reloaded.pt"
    dtype = "bfloat16" if device.type == "cuda" else "float32"  # what training computed in
    done = subprocess.run([sys.executable, "-c", _RELOAD, str(exported), str(device), json.dumps(ids), str(target),
                           dtype], cwd=work, capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise RuntimeError(f"reloading the export without the library failed: {done.stderr.strip()[-1500:]}")
    reloaded = torch.load(target)
    with torch.no_grad():
        ours = load_student(run.path, convert=True, device=str(device), dtype=getattr(torch, dtype))(
            torch.tensor(ids, device=device)).logits.float().cpu()
    gap = float((reloaded - ours).abs().max() / ours.abs().max())
    tolerance = 1e-2 if dtype == "bfloat16" else 1e-5  # the same kernels either way: expected equal
    result.update(export_vs_load_student_max_relative_gap=gap, export_tolerance=tolerance,
                  passed=gap <= tolerance and all(d["passed"] for d in result["dtypes"].values()))
    return result


def check_compiled_rollouts(teacher: Any, tokenizer: Any, cfg: Any, group_size: int, device: torch.device,
                            batch: dict[str, torch.Tensor], out: str) -> dict[str, Any]:
    """Compiled rollouts on this device: whether the preset may ask for them (its LoRA student is refused,
    recorded with the refusal's words), then an on-policy rollout through the compiled sampler from a plain
    quantization-aware student (the form it supports) at the rehearsal's shape: first (compiling) and second
    rollout's seconds, tokens/s."""
    from onpolicy_lib import rollouts
    from onpolicy_lib.speed.contenders import our_trainer
    from onpolicy_lib.speed.timing import sync
    from onpolicy_lib.student import build_student

    result: dict[str, Any] = {}
    try:
        rollouts.check_options("float32", "linear", True, fsdp=cfg.fsdp, lora_r=cfg.lora_r)
        result["preset"] = "accepted"
    except ValueError as err:
        result["preset"] = f"refused: {err}"
    torch.manual_seed(cfg.seed)
    student = build_student(teacher, cfg.quant_type, group_size, None, train_embeddings=False,
                            quantize_head=cfg.quantize_head).to(device)
    trainer = our_trainer(student, teacher, tokenizer, cfg, device, out, lmbda=1.0, rollout_compile=True)
    timings = []
    with torch.no_grad(), trainer.shared_weights(trainer.model):
        for _ in range(2):
            sync(device)
            start = time.perf_counter()
            trainer.rollout(trainer.model, batch)
            sync(device)
            timings.append(time.perf_counter() - start)
    tokens = batch["prompt_ids"].shape[0] * cfg.max_new_tokens
    return {**result, "student": "full fine-tuning form (plain quantization-aware)", "first_rollout_s": timings[0],
            "rollout_s": timings[1], "tokens_per_s": tokens / timings[1], "passed": True}


# ---------------------------------------------------------------------------- the run
def run(s: RehearsalSettings) -> dict[str, Any]:
    """Every section in order, within ``s.budget_s``; the report's figures (also written by :func:`main`)."""
    import datasets
    import transformers

    from onpolicy_lib import quantization
    from onpolicy_lib.batches import DistillCollator
    from onpolicy_lib.metrics import machine_description
    from onpolicy_lib.models import resolve_device, resolve_dtype
    from onpolicy_lib.speed.contenders import our_trainer, run_trainer, to_device, trl_batch, trl_trainer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    device = resolve_device(s.device)
    sections = Sections(s.budget_s, device, s.skip)
    report: dict[str, Any] = {
        "kind": "rehearsal", "shape": s.shape, "model": MODEL_NAME, "preset": PRESET, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": datetime.date.today().isoformat(), "machine": machine_description(device),
        "versions": _versions(), "settings": asdict(s), "steps": {}, "evaluation": {}, "checks": {},
    }
    state: dict[str, Any] = {}
    work = tempfile.TemporaryDirectory(prefix="rehearsal-")

    def setup() -> dict[str, Any]:
        tokenizer, dataset_name = _inputs(s)
        cfg = train_config(s, dataset_name, device)
        dtype = resolve_dtype(cfg.dtype, device)
        teacher = build_teacher(s, tokenizer, device, dtype)
        group_size = quantization.resolve_group_size(teacher, cfg.group_size, cfg.quantize_head)
        quantization.check_kernels(cfg.quant_type, device, group_size)
        prompt = s.prompt_tokens or cfg.max_length // 2
        if not 0 < prompt < cfg.max_length:
            raise ValueError(f"--prompt-tokens must be between 1 and max_length - 1 ({cfg.max_length - 1})")
        features, chats = synthesised_batch(tokenizer, dataset_name, cfg.per_device_train_batch_size, prompt,
                                            cfg.max_length - prompt)
        state.update(tokenizer=tokenizer, dataset_name=dataset_name, cfg=cfg, teacher=teacher, group_size=group_size,
                     features=features, chats=chats,
                     batch=to_device(DistillCollator(tokenizer.pad_token_id)(features), device))
        config = teacher.config
        return {"dtype": str(dtype), "group_size": group_size,
                "scheme": quantization.describe_scheme(cfg.quant_type, group_size, device, cfg.quantize_head),
                "parameters": sum(p.numel() for p in teacher.parameters()),
                "architecture": {k: getattr(config, k) for k in (
                    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "intermediate_size", "vocab_size", "tie_word_embeddings")},
                "batch": {"rows": len(features), "prompt_tokens": prompt, "completion_tokens": cfg.max_length - prompt,
                          "new_tokens": cfg.max_new_tokens, "tokenizer_ids": len(tokenizer)},
                "train": {k: getattr(cfg, k) for k in (
                    "quant_type", "group_size", "quantize_head", "lora_r", "lora_alpha", "lora_dropout", "lmbda",
                    "beta", "temperature", "max_length", "max_new_tokens", "min_new_tokens",
                    "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "max_steps",
                    "eval_steps", "heldout_eval_size", "dtype")}}

    report["setup"] = sections.run("setup", setup)
    if report["setup"] is None:
        report["sections"] = sections.record
        return report
    cfg, teacher, tokenizer, device_batch = state["cfg"], state["teacher"], state["tokenizer"], state["batch"]
    group_size = state["group_size"]
    rollout_tokens = len(state["features"]) * cfg.max_new_tokens
    gpu = device.type == "cuda"

    def ours(lmbda: float) -> Callable[[], dict[str, Any]]:
        def step() -> dict[str, Any]:
            trainer = our_trainer(_student(teacher, cfg, group_size, device), teacher, tokenizer, cfg, device,
                                  work.name, lmbda=lmbda)
            timing = run_trainer(trainer, device_batch, s.steps, s.warmup, device, "rollout", f"ours lambda={lmbda:g}")
            return step_figures(timing, cfg, rollout_tokens if lmbda else None)
        return step

    report["steps"]["lambda0"] = sections.run("step_lambda0", ours(0.0), needs_s=60 if gpu else 0)
    report["steps"]["lambda1"] = sections.run("step_lambda1", ours(1.0), needs_s=60 if gpu else 0)

    def trl() -> dict[str, Any]:
        # The original's setting (gradient_checkpointing False, which also lets TRL generate with a KV cache).
        trainer = trl_trainer(_student(teacher, cfg, group_size, device), teacher, tokenizer, cfg, device, work.name,
                              1.0, state["chats"], gradient_checkpointing=False)
        batch = to_device(trl_batch(state["features"], tokenizer, cfg.max_length), device)
        timing = run_trainer(trainer, batch, s.trl_steps, 1, device, "generate_on_policy_outputs", "TRL lambda=1")
        return step_figures(timing, cfg, rollout_tokens)

    report["steps"]["trl_lambda1"] = sections.run("trl_lambda1", trl, needs_s=90 if gpu else 0)
    batch_size = int(cfg.eval_parameters.get("batch_size", 32))
    report["evaluation"]["teacher"] = sections.run(
        "eval_teacher", lambda: evaluation_throughput(teacher, tokenizer, device, s, cfg.max_new_tokens, batch_size),
        needs_s=40 if gpu else 0)

    def eval_student() -> dict[str, Any]:
        # The round-to-nearest student costs what a trained student costs: converted, in its evaluation form
        # (on CUDA still on the int4 kernels; on CPU dequantized).
        student = quantization.quantize_ptq(copy.deepcopy(teacher), cfg.quant_type, group_size, cfg.quantize_head)
        quantized = quantization.quantization_summary(student)["quantized"]
        state["student"] = quantization.dequantize_for_eval(student).eval()
        figures = evaluation_throughput(state["student"], tokenizer, device, s, cfg.max_new_tokens, batch_size)
        figures["quantized_layers"] = quantized
        figures["layers_on_kernels"] = quantization.quantization_summary(state["student"])["quantized"]
        return figures

    report["evaluation"]["student"] = sections.run("eval_student", eval_student, needs_s=60 if gpu else 0)
    student = state.get("student")
    checks = report["checks"]

    def span_scoring() -> dict[str, Any]:
        models = {"teacher": teacher, **({"student": student} if student is not None else {})}
        result = {who: check_span_scoring(model, tokenizer, s, batch_size) for who, model in models.items()}
        return {**result, "passed": all(v["passed"] for v in result.values())}

    checks["span_scoring"] = sections.run("check_span_scoring", span_scoring, needs_s=30 if gpu else 0)
    window = int(cfg.eval_parameters.get("perplexity_window", cfg.max_length))
    checks["span_perplexity"] = sections.run("check_span_perplexity",
                                             lambda: check_span_perplexity(student or teacher, tokenizer, window),
                                             needs_s=20 if gpu else 0)
    checks["fidelity_order"] = sections.run(
        "check_fidelity_order",
        lambda: check_fidelity_order(teacher, student or teacher, tokenizer, state["dataset_name"], cfg),
        needs_s=30 if gpu else 0)
    state.pop("student", None)
    student = None
    checks["run_eval_export"] = sections.run(
        "check_run_eval_export",
        lambda: check_run_eval_export(tokenizer, state["dataset_name"], device, Path(work.name)),
        needs_s=60 if gpu else 0)
    checks["compiled_rollouts"] = sections.run(
        "check_compiled_rollouts",
        lambda: check_compiled_rollouts(teacher, tokenizer, cfg, group_size, device, device_batch, work.name),
        needs_s=150 if gpu else 0)
    report["sections"] = sections.record
    report["elapsed_s"] = round(time.perf_counter() - sections.start, 1)
    try:
        report["cost"] = study_cost(report)
    except (KeyError, TypeError, ZeroDivisionError) as err:  # a figure it needs was not measured
        report["cost_not_estimated"] = f"{type(err).__name__}: {err}"
    with contextlib.suppress(OSError):
        work.cleanup()
    return report


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "torchao", "trl", "peft", "lm-eval", "accelerate"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


# ---------------------------------------------------------------------------- the study's cost
@dataclass(frozen=True)
class CostAssumptions:
    """What :func:`study_cost` assumes beyond the measured figures (each stated in its output)."""

    gpus_original: int = 8  # the original's layout: DDP over 8 GPUs, 4 x 2 per GPU (global batch 64)
    heldout_forward_share: float = 1 / 3  # a held-out batch (teacher + student forward) / a λ=0 micro-step
    lora_forms: int = 2  # a LoRA student is evaluated in both deployed forms (merged; int4 base + adapter)

    def stated(self) -> list[str]:
        return [
            "every micro-step costs what the rehearsal's batch cost: rows at max_length at λ=0, and at λ>0 the "
            "prompt plus all max_new_tokens (random weights rarely emit an end-of-sequence token)",
            "λ between 0 and 1: a micro-batch is on-policy with probability λ, so its expected cost is the mix",
            "other rollout lengths: the rollout part scales with new tokens, the rest with the on-policy "
            "batch length",
            "LoRA rank, β, learning rate, seed and bit width change no cost (bit widths other than int4 use "
            "another fake quantizer of the same arithmetic)",
            f"held-out divergence every eval_steps on heldout_eval_size chats (and before and after training): "
            f"each batch costs {self.heldout_forward_share:.2f} of a λ=0 micro-step",
            f"evaluation of each student (a LoRA student in {self.lora_forms} forms, merged and adapter): the five "
            "benchmarks' full splits at "
            "the converted student's documents/s, fidelity's generation (sampled and greedy) at its "
            "tokens/s; the teacher and one PTQ baseline per scheme once per sweep at their own rates; "
            "wikitext-2 perplexity, the generation-quality tasks (generation_tasks) and GPTQ/AWQ calibration are "
            "not included",
            f"benchmark documents: synthetic, at the mean request lengths of {PROFILE_FILE} (measured with the "
            "packaged SmolLM2 tokenizer, which splits text into more tokens than Qwen's: evaluation is "
            "overstated rather than understated)",
            f"the original's layout: {self.gpus_original} GPUs in data parallel, each taking "
            f"accumulation / {self.gpus_original} micro-steps per optimizer step (at least 1), gradients' "
            "all-reduce (LoRA adapters only) and start-up not counted; evaluation on one GPU; GPU-hours are "
            "GPUs x wall-clock hours",
        ]


def _micro_step_s(steps: dict[str, Any], batch: dict[str, Any], lmbda: float, new_tokens: int) -> float:
    t0, t1 = steps["lambda0"]["micro_step_s"], steps["lambda1"]["micro_step_s"]
    rollout = steps["lambda1"].get("rollout_s") or 0.0
    measured_new, prompt = batch["new_tokens"], batch["prompt_tokens"]
    t1_scaled = rollout * new_tokens / measured_new + (t1 - rollout) * (prompt + new_tokens) / (prompt + measured_new)
    return (1 - lmbda) * t0 + lmbda * t1_scaled


def _evaluation_s(figures: dict[str, Any], fidelity_samples: int, new_tokens: int) -> float:
    lm_eval = sum(FULL_SPLITS[t] / v["docs_per_s"] for t, v in figures["loglikelihood"].items())
    fidelity = 2 * fidelity_samples * new_tokens / figures["generation"]["tokens_per_s"]  # sampled + greedy
    return lm_eval + fidelity


def run_cost(params: dict[str, Any], report: dict[str, Any], a: CostAssumptions = CostAssumptions()) -> dict[str, Any]:
    """Hours of one run (training, its held-out evaluations, its student's evaluation) on the rehearsal's
    GPU, and wall-clock and GPU-hours in the original's layout."""
    steps, batch = report["steps"], report["setup"]["batch"]
    micro = _micro_step_s(steps, batch, float(params["lmbda"]), int(params["max_new_tokens"]))
    accumulation = int(params["gradient_accumulation_steps"])
    optimizer = steps["lambda0"]["optimizer_s"]
    scale = int(params["per_device_train_batch_size"]) / batch["rows"]  # micro-batches of another size: linear
    per_step = accumulation * micro * scale + optimizer
    per_step_8 = max(1.0, accumulation / a.gpus_original) * micro * scale + optimizer
    max_steps = int(params["max_steps"])
    evals = (max_steps // int(params["eval_steps"]) if params.get("eval_steps") else 0) + 2
    heldout = evals * math.ceil(int(params["heldout_eval_size"]) / int(params["per_device_train_batch_size"])) * (
        a.heldout_forward_share * steps["lambda0"]["micro_step_s"] * scale)
    evaluation = 0.0
    if params.get("do_eval"):
        fidelity_samples = int((params.get("eval_parameters") or {}).get("fidelity_samples") or 0)
        forms = a.lora_forms if params.get("lora_r") else 1
        evaluation = forms * _evaluation_s(report["evaluation"]["student"], fidelity_samples,
                                           int(params["max_new_tokens"]))
    train_h, heldout_h, eval_h = max_steps * per_step / 3600, heldout / 3600, evaluation / 3600
    wall_8 = (max_steps * per_step_8 + heldout) / 3600
    return {"train_h": train_h, "heldout_h": heldout_h, "eval_h": eval_h, "gpu_h": train_h + heldout_h + eval_h,
            "wall_h_original_layout": wall_8 + eval_h,
            "gpu_h_original_layout": a.gpus_original * wall_8 + eval_h}


def study_cost(report: dict[str, Any], sweeps: list[str] | None = None,
               assumptions: CostAssumptions = CostAssumptions()) -> dict[str, Any]:
    """Estimated GPU-hours of each ``qwen_*`` sweep (its runs and steps from the sweep's own expansion) on the
    report's device, and on the original's 8-GPU layout; with every assumption stated."""
    from onpolicy_lib.sweep import SWEEPS_DIR, expand

    names = sweeps or sorted(p.stem for p in SWEEPS_DIR.glob("qwen_*.yaml"))
    out: dict[str, Any] = {"device": report.get("device_name"), "shape": report.get("shape"),
                           "assumptions": assumptions.stated(), "sweeps": {}}
    teacher_eval = _evaluation_s(report["evaluation"]["teacher"], 0, 0)
    ptq_eval = _evaluation_s(report["evaluation"]["student"], 0, 0)
    for name in names:
        sweep = expand(name, check_models=False)
        runs = [run_cost(r.params, report, assumptions) for r in sweep.runs]
        schemes = {(r.params["quant_type"], r.params["group_size"]) for r in sweep.runs}
        baselines_h = (teacher_eval + len(schemes) * ptq_eval) / 3600 if sweep.eval else 0.0
        out["sweeps"][name] = {
            "runs": len(runs), "steps": sum(int(r.params["max_steps"]) for r in sweep.runs),
            "gpu_h": sum(r["gpu_h"] for r in runs) + baselines_h,
            "train_h": sum(r["train_h"] for r in runs), "eval_h": sum(r["eval_h"] for r in runs) + baselines_h,
            "gpu_h_original_layout": sum(r["gpu_h_original_layout"] for r in runs) + baselines_h,
            "wall_h_original_layout": sum(r["wall_h_original_layout"] for r in runs) + baselines_h,
        }
    out["total_gpu_h"] = sum(v["gpu_h"] for v in out["sweeps"].values())
    out["total_gpu_h_original_layout"] = sum(v["gpu_h_original_layout"] for v in out["sweeps"].values())
    return out


# ---------------------------------------------------------------------------- the report
def _number(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_report(r: dict[str, Any]) -> str:
    """The report as text: what ran where, per-step figures, evaluation throughput, checks, the study's cost."""
    setup = r.get("setup") or {}
    lines = [f"onpolicy-quant rehearsal: the {r['preset']} preset on {r['model']} ({r['shape']} shape)",
             f"device    {r['device_name']} ({r['device']}); {r['machine']}; {r['date']}",
             "versions  " + ", ".join(f"{k} {v}" for k, v in r["versions"].items())]
    if setup:
        b, arch = setup["batch"], setup["architecture"]
        lines += [f"model     {setup['parameters'] / 1e9:.2f}B parameters: " + ", ".join(f"{k} {v}" for k, v in
                                                                                    arch.items()),
                  f"student   {setup['scheme'].get('config')} ({setup['scheme'].get('packing', '')}) group "
                  f"{setup['group_size']}, head {setup['scheme'].get('head')}; LoRA r={setup['train']['lora_r']}; "
                  f"compute dtype {setup['dtype']}",
                  f"batch     {b['rows']} x ({b['prompt_tokens']} prompt + {b['completion_tokens']} completion) tokens "
                  f"synthesised from real chats; lambda=1: {b['new_tokens']} new tokens per row (min = max); "
                  f"accumulation {setup['train']['gradient_accumulation_steps']}"]
    lines.append("")
    lines.append(f"{'step (timed by the speed benchmark driver)':<44}{'s/step':>9}{'micro s':>9}{'opt. s':>8}"
                 f"{'s/opt.step':>11}{'rollout s':>10}{'tok/s':>9}{'peak MB':>10}")
    for key, section, label in (("lambda0", "step_lambda0", "ours, lambda=0"),
                                ("lambda1", "step_lambda1", "ours, lambda=1"),
                                ("trl_lambda1", "trl_lambda1", "stock TRL GKDTrainer, lambda=1")):
        f = r["steps"].get(key)
        if not f:
            lines.append(f"{label:<44}{r['sections'].get(section, {}).get('status', 'not run'):>9}")
            continue
        lines.append(f"{label:<44}{f['step_s']:>9.2f}{f['micro_step_s']:>9.2f}{f['optimizer_s']:>8.3f}"
                     f"{f['optimizer_step_s']:>11.1f}{_number(f.get('rollout_s'), '.2f'):>10}"
                     f"{_number(f.get('rollout_tokens_per_s'), '.0f'):>9}{_number(f.get('peak_mb'), '.0f'):>10}")
    ours1, trl1 = r["steps"].get("lambda1"), r["steps"].get("trl_lambda1")
    if ours1 and trl1:
        lines.append(f"TRL lambda=1 / ours lambda=1 (full step): {trl1['step_s'] / ours1['step_s']:.2f}x")
    lines.append("")
    lines.append(f"{'evaluation (lm-eval span-only scorer)':<40}" + "".join(f"{t:>14}" for t in DOCUMENT_SHAPES)
                 + f"{'fwd tok/s':>11}{'gen tok/s':>11}")
    for who in ("teacher", "student"):
        e = r["evaluation"].get(who)
        if not e:
            lines.append(f"{who:<40}{r['sections'].get('eval_' + who, {}).get('status', 'not run'):>14}")
            continue
        lines.append(f"{who + ' docs/s':<40}" + "".join(f"{e['loglikelihood'][t]['docs_per_s']:>14.1f}"
                                                          for t in DOCUMENT_SHAPES)
                     + f"{e['forward_tokens_per_s']:>11.0f}{e['generation']['tokens_per_s']:>11.1f}")
    any_eval = r["evaluation"].get("teacher") or r["evaluation"].get("student")
    if any_eval:
        lines.append("  documents: " + "; ".join(
            f"{t} {v['choices']} x ({v['lengths'][0]} + {v['lengths'][1]}) tokens"
            for t, v in any_eval["loglikelihood"].items()) + f"; batch size {any_eval['batch_size']}; "
            f"generation {any_eval['generation']['rows']} rows x {any_eval['generation']['new_tokens']} new tokens")
    lines.append("")
    lines.append("sections and checks")
    for name, entry in r["sections"].items():
        detail = entry.get("reason") or (entry.get("error") or "").splitlines()[0] if entry.get("reason") or \
            entry.get("error") else ""
        extra = ""
        check = r["checks"].get(name.removeprefix("check_")) if name.startswith("check_") else None
        if check:
            extra = "  " + json.dumps({k: v for k, v in check.items() if k != "passed"}, default=str)[:300]
        peak = f"  peak {entry['peak_gpu_mb']} MB" if "peak_gpu_mb" in entry else ""
        lines.append(f"  {name:<26}{entry['status']:<8}{_number(entry.get('seconds'), '.1f'):>7} s{peak}"
                     + (f"  {detail}" if detail else "") + extra)
    cost = r.get("cost")
    if cost:
        lines += ["", f"estimated cost of the study on {cost['device']} (from this report's figures; "
                      f"{cost['shape']} shape)",
                  f"  {'sweep':<18}{'runs':>5}{'steps':>9}{'GPU-h':>10}{'train h':>10}{'eval h':>9}"
                  f"{'8-GPU GPU-h':>13}{'8-GPU wall h':>14}"]
        for name, v in cost["sweeps"].items():
            lines.append(f"  {name:<18}{v['runs']:>5}{v['steps']:>9}{v['gpu_h']:>10.1f}{v['train_h']:>10.1f}"
                         f"{v['eval_h']:>9.1f}{v['gpu_h_original_layout']:>13.1f}{v['wall_h_original_layout']:>14.1f}")
        lines.append(f"  all qwen_* sweeps: {cost['total_gpu_h']:.0f} GPU-hours on one GPU, "
                     f"{cost['total_gpu_h_original_layout']:.0f} in the original's 8-GPU layout")
        lines += ["  assumptions:", *(f"  - {a}" for a in cost["assumptions"])]
    else:
        lines += ["", "cost of the study: not estimated (a step or an evaluation section did not complete: "
                      f"{r.get('cost_not_estimated', 'no figures')})"]
    lines.append(f"elapsed {r.get('elapsed_s', float('nan')):.0f} s of a {r['settings']['budget_s']:.0f} s budget")
    return "\n".join(lines)


def report_paths(out: str | Path, device_name: str, date: str, shape: str) -> tuple[Path, Path]:
    """``rehearsal[_tiny]_<device>_<date>[_N].txt/.json`` under ``out``: the first pair that exists neither
    as text nor as JSON, so no report is overwritten."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "device"
    stem = f"rehearsal{'' if shape == 'full' else '_' + shape}_{slug}_{date}"
    out = Path(out)
    for n in range(1, 1000):
        name = stem if n == 1 else f"{stem}_{n}"
        text, data = out / f"{name}.txt", out / f"{name}.json"
        if not text.exists() and not data.exists():
            return text, data
    raise FileExistsError(f"{out}: too many reports named {stem}*")


def write_report(report: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    text_path, json_path = report_paths(out, report["device_name"], report["date"], report["shape"])
    text_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, default=str))
    text_path.write_text(format_report(report) + "\n")
    return text_path, json_path


# ---------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> tuple[RehearsalSettings, dict[str, str]]:
    d = RehearsalSettings()
    p = argparse.ArgumentParser(prog="python -m onpolicy_lib.speed.rehearsal", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", default=d.shape, choices=list(SHAPES), help="full: Qwen3-4B's; tiny: 2 layers (CPU)")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    p.add_argument("--out", default=d.out, help="directory of the text and JSON reports")
    p.add_argument("--bundle", default=d.bundle, help="tokenizer + chats from --make-bundle (default: offline assets)")
    p.add_argument("--make-bundle", default=None, metavar="DIR", help="write the bundle to DIR and exit")
    p.add_argument("--cost-from", default=None, metavar="JSON",
                   help="print the study's estimated cost from an existing report (with the sweeps as they are now) "
                        "and exit")
    p.add_argument("--write-benchmark-profile", default=None, metavar="JSON",
                   help="measure the benchmarks' request lengths on the offline assets, write them, and exit")
    p.add_argument("--budget-s", type=float, default=d.budget_s, help="stop starting sections after this")
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps of ours")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps before them")
    p.add_argument("--trl-steps", type=int, default=d.trl_steps, help="timed steps of stock TRL (after 1 warm-up)")
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens, help="of max_length (default: half)")
    p.add_argument("--eval-docs", type=int, default=d.eval_docs, help="synthetic documents per benchmark")
    p.add_argument("--generation-rows", type=int, default=d.generation_rows, help="rows of the generation batch")
    p.add_argument("--skip", nargs="*", default=[], choices=list(SECTIONS), help="sections not to run")
    ns = vars(p.parse_args(argv))
    # The one-off actions: each runs instead of the rehearsal.
    actions = {name: ns.pop(name) for name in ("make_bundle", "cost_from", "write_benchmark_profile")}
    try:
        return RehearsalSettings(**ns), {k: v for k, v in actions.items() if v}
    except ValueError as err:
        p.error(str(err))
        raise  # unreachable: p.error exits


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    settings, actions = parse_args(argv)
    if "make_bundle" in actions:
        print(f"bundle written to {make_bundle(actions['make_bundle'])}")
        return None
    if "cost_from" in actions:
        report = json.loads(Path(actions["cost_from"]).read_text())
        report["cost"] = study_cost(report)
        text = format_report(report)
        print(text[text.index("estimated cost"):])
        return report
    if "write_benchmark_profile" in actions:
        from onpolicy_lib.assets import PACKAGED_MODEL
        from onpolicy_lib.models import load_tokenizer

        path = Path(actions["write_benchmark_profile"])
        profile = benchmark_request_lengths(load_tokenizer(PACKAGED_MODEL), PACKAGED_MODEL)
        path.write_text(json.dumps(profile, indent=2) + "\n")
        print(f"benchmark request lengths written to {path}")
        return None
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    report = run(settings)
    text_path, json_path = write_report(report, settings.out)
    print(format_report(report), flush=True)
    print(f"\nreport: {text_path} and {json_path}")
    return report


if __name__ == "__main__":
    main()
