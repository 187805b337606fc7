"""Tests for onpolicy_lib.data; no offline assets or network needed (except the integration test)."""

from __future__ import annotations

import gzip
import json
import string
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from onpolicy_lib import assets
from onpolicy_lib.data import (
    HELDOUT_PER_SOURCE,
    MINERVA_TASKS,
    OFFLINE_MIXTURE,
    SOURCES,
    build_offline_mixture,
    check_dataset_name,
    filter_reason,
    load_chat_dataset,
    mixture_cache_path,
    stratified_sample,
    tokenize_for_distillation,
)

CAP, HELDOUT = 10, 4


# --------------------------------------------------------------------------
# A fake oe_eval_tasks tree
# --------------------------------------------------------------------------


def _write_task(root: Path, task: str, variant: str, requests: list[dict]) -> None:
    d = assets.task_docs_dir(root) / task / variant
    d.mkdir(parents=True, exist_ok=True)
    with gzip.open(d / "requests.jsonl.gz", "wt", encoding="utf-8") as f:
        for req in requests:
            f.write(json.dumps(req) + "\n")
    (d / "config.json").write_text("{}")


def _req(doc_id: int, native_id: object, doc: dict) -> dict:
    # The few-shot context is deliberately junk: the builder must not use it.
    return {
        "request_type": "loglikelihood",
        "doc": doc,
        "request": {"context": "FEWSHOT-CONTEXT", "continuation": " x"},
        "doc_id": doc_id,
        "native_id": native_id,
        "label": "x",
    }


def make_fake_root(root: Path, n: int = 20) -> Path:
    # Just enough for assets.assets_ready(); the model files are never read.
    root.mkdir(parents=True)
    (root / "assets.json").write_text("{}")
    model = assets.packaged_model_dir(root)
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"")
    (model / assets.PRECISION_FILE).write_text("{}")
    assets.hf_datasets_dir(root).mkdir(parents=True)

    gsm = [_req(i, i, {"question": f"Q{i}?", "choices": [f"Work {i}. So the answer is {i}."]})
           for i in range(n)]
    gsm.append(gsm[0])  # a second request on the same doc: must be deduplicated by doc_id
    _write_task(root, "gsm8k", "gold_bpb_5shot", gsm)
    for t in MINERVA_TASKS:
        docs = [_req(i, i, {"problem": f"{t} problem {i}", "solution": f"$\\boxed{{{i}}}$"})
                for i in range(4)]
        _write_task(root, t, "gold_bpb_0shot", docs)
    mbpp = [
        _req(i, 100 + i, {"text": f"Write f{i}.", "code": f"def f{i}(): \r\n    return {i} ", "test_list":
                          [f"assert f{i}() == {i}"]})
        for i in range(n)
    ]
    _write_task(root, "codex_mbpp", "gold_bpb_0shot", mbpp)
    coqa, k = [], 0
    for s in range(n):
        qa = [{"question": f"s{s} q{t}?", "answer": f"a{t}"} for t in range(7)]
        for t in range(7):
            doc = {"story": f"Story {s}.", "question": qa[t]["question"], "previous_qa": qa}
            coqa.append(_req(k, f"story{s}_turn{t}", doc))
            k += 1
    _write_task(root, "coqa", "bpb_0shot", coqa)
    squad = [
        _req(i, f"sq{i}", {
            "query": f"Title: T_{i}\nBackground: Line one.\nLine two {i}.\nQuestion: Q{i}?\nAnswer:",
            "choices": [f"span {i}"],
        })
        for i in range(n)
    ]
    _write_task(root, "squad", "bpb_5shot", squad)
    drop = [
        _req(i, f"dr{i}", {"passage": f"P{i}.", "question": f"Q{i}?", "choices": [[f"s{i}", "t"]]})
        for i in range(n)
    ]
    _write_task(root, "drop", "bpb_5shot", drop)
    # Jeopardy holds repeated clues; both copies must land in the same split.
    jeo = [_req(i, i, {"query": f"Category: CAT\nQuestion: clue {i % (n // 2)}\nAnswer:",
                       "answer": f"ans {i}"})
           for i in range(n)]
    _write_task(root, "jeopardy", "bpb_5shot", jeo)
    nq = [_req(i, 1000 + i, {"question": f"who is {i}", "choices": [f"person {i}"]}) for i in range(n)]
    nq.append(_req(n, 9999, {"question": "empty answer", "choices": ["  "]}))  # unusable: skipped
    _write_task(root, "naturalqs_open", "bpb_5shot", nq)
    return root


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    return make_fake_root(tmp_path / "cache")


def _rows(ds: Dataset) -> list[tuple]:
    return [(r["id"], r["source"], json.dumps(r["messages"])) for r in ds]


# --------------------------------------------------------------------------
# Mixture builder
# --------------------------------------------------------------------------


def test_mixture_schema_and_caps(fake_root: Path) -> None:
    mix = build_offline_mixture(fake_root, per_source_cap=CAP, heldout_per_source=HELDOUT)
    assert set(mix) == {"train", "heldout"}
    for split in mix.values():
        assert split.column_names == ["messages", "source", "id"]
        for r in split:
            roles = [m["role"] for m in r["messages"]]
            assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
            assert all(m["content"].strip() for m in r["messages"])
            assert "FEWSHOT-CONTEXT" not in json.dumps(r["messages"])
    train_src = [r["source"] for r in mix["train"]]
    held_src = [r["source"] for r in mix["heldout"]]
    assert set(train_src) == set(held_src) == set(SOURCES)
    for s in SOURCES:
        assert held_src.count(s) == HELDOUT
        # jeopardy loses n/2 duplicate clues (20 docs -> 10 unique), the others have >= CAP + HELDOUT rows.
        assert train_src.count(s) == (10 - HELDOUT if s == "jeopardy" else CAP)
    ids = list(mix["train"]["id"]) + list(mix["heldout"]["id"])
    assert len(ids) == len(set(ids))


def test_mixture_deterministic_fixed_and_disjoint(tmp_path: Path) -> None:
    a = build_offline_mixture(make_fake_root(tmp_path / "a"), per_source_cap=CAP, heldout_per_source=HELDOUT)
    b = build_offline_mixture(make_fake_root(tmp_path / "b"), per_source_cap=CAP, heldout_per_source=HELDOUT)
    assert _rows(a["train"]) == _rows(b["train"])
    assert _rows(a["heldout"]) == _rows(b["heldout"])
    # The held-out slice does not depend on the cap; smaller caps take a prefix of train.
    small = build_offline_mixture(tmp_path / "a", per_source_cap=3, heldout_per_source=HELDOUT)
    assert sorted(_rows(small["heldout"])) == sorted(_rows(a["heldout"]))
    assert set(small["train"]["id"]) < set(a["train"]["id"])
    # Disjoint by id and by prompt text (repeated jeopardy clues).
    assert not set(a["train"]["id"]) & set(a["heldout"]["id"])
    prompts = {json.dumps(m[:-1]) for m in a["heldout"]["messages"]}
    assert not prompts & {json.dumps(m[:-1]) for m in a["train"]["messages"]}


def test_mixture_sources_render_docs(fake_root: Path) -> None:
    mix = build_offline_mixture(fake_root, per_source_cap=100, heldout_per_source=2)
    rows = {r["id"]: r["messages"] for split in mix.values() for r in split}
    assert rows["gsm8k:3"][-1]["content"] == "Work 3. So the answer is 3."
    assert rows["codex_mbpp:105"][-1]["content"] == "```python\ndef f5():\n    return 5\n```"
    assert "assert f5() == 5" in rows["codex_mbpp:105"][0]["content"]
    assert rows["squad:sq1"][-1]["content"] == "span 1"
    assert "Line one.\nLine two 1." in rows["squad:sq1"][0]["content"]
    assert rows["drop:dr2"][-1]["content"] == "s2, t"
    assert rows["naturalqs_open:1004"][0]["content"].endswith("who is 4?")
    assert not any(i.startswith("naturalqs_open:9999") for i in rows)
    assert sum(i.startswith("minerva_math_") for i in rows) == 4 * len(MINERVA_TASKS)
    assert sum(i.startswith("gsm8k:") for i in rows) == 20  # the duplicated request counted once
    # CoQA: one multi-turn example per story, the story in the first user turn.
    coqa = {i: m for i, m in rows.items() if i.startswith("coqa:")}
    assert len(coqa) == 20 and "coqa:story3" in coqa
    for i, m in coqa.items():
        s = i.removeprefix("coqa:story")
        assert 2 <= len(m) <= 10 and m[0]["content"].count(f"Story {s}.") == 1
        assert [x["content"] for x in m[1::2]] == [f"a{t}" for t in range(len(m) // 2)]
    assert len({len(m) for m in coqa.values()}) > 1  # conversation lengths vary


def test_mixture_is_cached_on_disk(tmp_path: Path) -> None:
    # More documents per source than the default held-out share, so the default mixture has a train split.
    fake_root = make_fake_root(tmp_path / "cache", n=HELDOUT_PER_SOURCE + 10)
    first = build_offline_mixture(fake_root)
    assert mixture_cache_path(fake_root, 1000, HELDOUT_PER_SOURCE).is_dir()
    # Break the source files: cached loads must not read them.
    for p in assets.task_docs_dir(fake_root).rglob("requests.jsonl.gz"):
        p.write_bytes(gzip.compress(b""))
    again = build_offline_mixture(fake_root)
    assert _rows(again["train"]) == _rows(first["train"])
    train, heldout = load_chat_dataset(OFFLINE_MIXTURE, root=fake_root)
    assert _rows(train) == _rows(first["train"]) and _rows(heldout) == _rows(first["heldout"])
    # A rebuild from the broken files fails loudly instead of caching an empty mixture.
    with pytest.raises(assets.AssetsMissingError, match="no usable documents"):
        build_offline_mixture(fake_root, rebuild=True)


def test_missing_assets_names_setup_command(tmp_path: Path) -> None:
    with pytest.raises(assets.AssetsMissingError, match="onpolicy_lib.assets"):
        build_offline_mixture(tmp_path / "empty")


def test_missing_task_file_names_setup_command(fake_root: Path) -> None:
    (assets.task_docs_dir(fake_root) / "drop" / "bpb_5shot" / "requests.jsonl.gz").unlink()
    with pytest.raises(assets.AssetsMissingError, match="onpolicy_lib.assets"):
        build_offline_mixture(fake_root, per_source_cap=CAP, heldout_per_source=HELDOUT)


# --------------------------------------------------------------------------
# Dataset names and local datasets
# --------------------------------------------------------------------------


def _chat_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(n)]


@pytest.mark.parametrize("name", [OFFLINE_MIXTURE, "allenai/tulu-3-sft-mixture", "org/name.v2"])
def test_check_dataset_name_accepts(name: str) -> None:
    check_dataset_name(name)


def test_check_dataset_name_accepts_local_path(tmp_path: Path) -> None:
    check_dataset_name(str(tmp_path))


@pytest.mark.parametrize(
    "name", ["", "offline_mixture", "a/b/c", "/no/such/file.jsonl", "org/", "bad name/x"]
)
def test_check_dataset_name_rejects(name: str) -> None:
    with pytest.raises(ValueError, match="dataset_name") as err:
        check_dataset_name(name)
    assert "\n" not in str(err.value) and "org/name" in str(err.value)


def test_load_local_jsonl_carves_fixed_heldout(tmp_path: Path) -> None:
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _chat_rows(50)))
    train, heldout = load_chat_dataset(str(path))
    assert (len(train), len(heldout)) == (45, 5)  # min(256, len // 10)
    assert train.column_names == ["messages", "source", "id"] and heldout["source"][0] == str(path)
    assert not set(train["id"]) & set(heldout["id"])
    assert load_chat_dataset(str(path))[1]["id"] == heldout["id"]  # fixed, not seed-dependent


def test_load_local_save_to_disk_and_parquet(tmp_path: Path) -> None:
    dd = DatasetDict({"train": Dataset.from_list(_chat_rows(8)), "heldout": Dataset.from_list(_chat_rows(3))})
    dd.save_to_disk(str(tmp_path / "dd"))
    train, heldout = load_chat_dataset(str(tmp_path / "dd"))
    assert (len(train), len(heldout)) == (8, 3)
    (tmp_path / "pq").mkdir()
    Dataset.from_list(_chat_rows(30)).to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    train, heldout = load_chat_dataset(str(tmp_path / "pq"))
    assert (len(train), len(heldout)) == (27, 3)


def test_load_without_messages_column_is_clear(tmp_path: Path) -> None:
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n" + json.dumps({"text": "bye"}) + "\n")
    with pytest.raises(ValueError, match=r"plain\.jsonl.*'messages'"):
        load_chat_dataset(str(path))


# --------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Not prefix-consistent: the generation prompt differs from how assistant turns are rendered.
ODD_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}[bot] {% endif %}"
)


def char_tokenizer(template: str = CHATML):
    """One token per character, plus the ChatML specials; lengths are easy to count by hand."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(string.printable)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<|im_end|>",
                                  bos_token="<|im_start|>")
    tok.chat_template = template
    return tok


def _chat(user: str, assistant: str, source: str = "s") -> dict:
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": msgs, "source": source, "id": f"{source}:{user[:8]}:{len(assistant)}"}


def _prompt_len(user: str) -> int:
    # <|im_start|> "user\n" content <|im_end|> "\n" <|im_start|> "assistant\n"
    return 1 + 5 + len(user) + 1 + 1 + 1 + 10


def test_tokenize_ids_and_eos_truncation() -> None:
    tok = char_tokenizer()
    ds = Dataset.from_list([_chat("hello", "world", "src")])
    out, counts = tokenize_for_distillation(ds, tok, max_length=64, min_completion_tokens=4)
    assert out.column_names == ["source", "id", "prompt_ids", "completion_ids"]
    row = out[0]
    assert tok.decode(row["prompt_ids"]) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    # The template's trailing "\n" after <|im_end|> is cut: completion ends at EOS.
    assert tok.decode(row["completion_ids"]) == "world<|im_end|>"
    assert row["completion_ids"][-1] == tok.eos_token_id and row["source"] == "src"
    assert counts["template_fallback"] == 0 and counts["kept"] == 1


def test_tokenize_multi_turn_prompt_holds_history() -> None:
    tok = char_tokenizer()
    msgs = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    out, _ = tokenize_for_distillation(Dataset.from_list([{"messages": msgs}]), tok, 128, 2)
    assert tok.decode(out[0]["prompt_ids"]).endswith("a1<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n"
                                                      "<|im_start|>assistant\n")
    assert tok.decode(out[0]["completion_ids"]) == "a2<|im_end|>"
    assert out.column_names == ["prompt_ids", "completion_ids"]


def original_filter(prompt_len: int, full_len: int, completion_len: int, max_length: int, m: int) -> bool:
    """The original study's ``filter_dataset`` rules, written out as its code states them."""
    return (prompt_len < max_length - m and min(full_len, max_length) - prompt_len >= m
            and completion_len < max_length)


def test_filter_matches_the_original_rules_on_constructed_lengths() -> None:
    for max_length in (20, 64):
        for m in (1, 4, 8):
            for prompt_len in range(0, max_length + 3):
                for completion_len in range(0, max_length + 3):
                    kept = filter_reason(prompt_len, completion_len, max_length, m) == ""
                    assert kept == original_filter(prompt_len, prompt_len + completion_len, completion_len,
                                                   max_length, m), (prompt_len, completion_len, max_length, m)


def test_tokenize_filter_reasons_exact_counts_and_truncation() -> None:
    tok = char_tokenizer()
    max_length, m = 60, 6
    ok_user = "x" * (max_length - m - 1 - _prompt_len(""))  # the longest prompt kept: max_length - m - 1
    rows = [
        _chat("fine", "yes please"),  # 10 + eos = 11 completion tokens: kept
        # prompt + completion (incl. eos) == max_length: kept whole
        _chat(ok_user, "y" * (max_length - _prompt_len(ok_user) - 1)),
        # over max_length but with >= m completion tokens within it: kept, truncated to max_length
        _chat("short", "z" * 45),
        _chat("", "answer"),  # empty_turn
        _chat("question", " \n\t"),  # empty_turn (whitespace-only)
        {"messages": [{"role": "user", "content": "only a user turn"}], "source": "s", "id": "u"},
        _chat(ok_user + "x", "y" * 10),  # prompt_too_long by one token
        _chat("x" * 200, "y"),  # prompt_too_long
        _chat("fine", "abcd"),  # completion_too_short: 5 tokens with eos
        _chat("tiny", "z" * 60),  # completion_too_long: the completion alone fills max_length
    ]
    out, counts = tokenize_for_distillation(Dataset.from_list(rows), tok, max_length, m)
    assert counts == {"total": 10, "last_not_assistant": 1, "empty_turn": 2, "prompt_too_long": 2,
                      "completion_too_short": 1, "completion_too_long": 1, "kept": 3, "truncated": 1,
                      "template_fallback": 0}
    lengths = [(len(r["prompt_ids"]), len(r["completion_ids"])) for r in out]
    assert lengths[1][0] == max_length - m - 1 and sum(lengths[1]) == max_length
    truncated = out[2]
    assert len(truncated["prompt_ids"]) + len(truncated["completion_ids"]) == max_length
    assert truncated["completion_ids"][-1] != tok.eos_token_id  # its tail, EOS included, was cut


def test_filter_does_not_depend_on_the_rollout_length() -> None:
    # The filter has no max_new_tokens: a rollout-length sweep trains and holds out the same examples.
    import inspect

    assert "max_new_tokens" not in inspect.signature(tokenize_for_distillation).parameters


def test_tokenize_falls_back_when_template_not_prefix_consistent() -> None:
    tok = char_tokenizer(ODD_TEMPLATE)
    out, counts = tokenize_for_distillation(Dataset.from_list([_chat("hi", "there")]), tok, 64, 4)
    assert counts["template_fallback"] == 1 and counts["kept"] == 1
    assert tok.decode(out[0]["prompt_ids"]) == "[user] hi<|im_end|>\n[bot] "
    assert tok.decode(out[0]["completion_ids"]) == "there<|im_end|>"


def test_tokenize_rejects_bad_budget() -> None:
    with pytest.raises(ValueError, match="min_completion_tokens"):
        tokenize_for_distillation(Dataset.from_list([_chat("a", "b")]), char_tokenizer(), 16, 16)


def test_stratified_sample_spreads_over_sources_with_a_fixed_seed() -> None:
    rows = [_chat(f"q{i}", "a", source) for source, n in (("math", 30), ("code", 12), ("qa", 3)) for i in range(n)]
    ds = Dataset.from_list(rows)
    sample = stratified_sample(ds, 12)
    assert len(sample) == 12 and sample["id"] == stratified_sample(ds, 12)["id"]  # fixed seed
    counts = {s: sample["source"].count(s) for s in ("math", "code", "qa")}
    assert counts["qa"] == 3 and {counts["math"], counts["code"]} == {4, 5}  # even, until a source runs out
    everything = stratified_sample(ds, 1000)
    assert sorted(everything["id"]) == sorted(ds["id"])  # a sample larger than the set is all of it
    assert stratified_sample(ds, 12, seed=1)["id"] != sample["id"]


# --------------------------------------------------------------------------
# Real assets (skipped when the cache is not set up)
# --------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.skipif(not assets.assets_ready(), reason=f"offline assets missing; run `{assets.SETUP_COMMAND}`")
def test_real_offline_mixture() -> None:
    from transformers import AutoTokenizer

    train, heldout = load_chat_dataset(OFFLINE_MIXTURE)
    assert set(heldout["source"]) == set(SOURCES) and len(heldout) == HELDOUT_PER_SOURCE * len(SOURCES)
    assert not set(train["id"]) & set(heldout["id"])
    tok = AutoTokenizer.from_pretrained(str(assets.packaged_model_dir()))
    out, counts = tokenize_for_distillation(heldout, tok, max_length=512)
    # The original's 32-token completion minimum keeps the math and code sources (long answers).
    assert {"gsm8k", "minerva_math", "codex_mbpp"} <= set(out["source"]) and counts["template_fallback"] == 0
    whole = [c for p, c in zip(out["prompt_ids"], out["completion_ids"], strict=True) if len(p) + len(c) < 512]
    assert whole and all(c[-1] == tok.eos_token_id for c in whole)  # only truncated ones lose their EOS


# ---------------------------------------------------------------------------- prepared once
def test_data_is_prepared_once_per_key_and_shared(tmp_path, tokenizer, tiny_dataset_dir, monkeypatch):
    import copy

    from onpolicy_lib import data

    monkeypatch.setenv("ONPOLICY_QUANT_PREPARED", str(tmp_path / "prepared"))
    first = data.prepare_distillation_data(str(tiny_dataset_dir), tokenizer, 96, 4)
    again = data.prepare_distillation_data(str(tiny_dataset_dir), tokenizer, 96, 4)
    assert not first.reused and again.reused and again.path == first.path
    assert again.train.to_list() == first.train.to_list() and again.heldout.to_list() == first.heldout.to_list()
    assert again.counts == first.counts and "reused" in again.describe(str(again.path))
    # The same as tokenizing directly; two worker processes give the same rows.
    train_chat, _ = data.load_chat_dataset(str(tiny_dataset_dir))
    direct, counts = data.tokenize_for_distillation(train_chat, tokenizer, 96, 4)
    assert direct.to_list() == first.train.to_list() and counts == first.counts["train"]
    parallel, _ = data.tokenize_for_distillation(train_chat, tokenizer, 96, 4, num_proc=2)
    assert parallel.to_list() == direct.to_list()
    # Another filter setting or another chat template is another prepared dataset.
    assert data.prepare_distillation_data(str(tiny_dataset_dir), tokenizer, 80, 4).path != first.path
    other = copy.deepcopy(tokenizer)
    other.chat_template = other.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert data.prepare_distillation_data(str(tiny_dataset_dir), other, 96, 4).path != first.path


def test_runs_of_a_sweep_share_the_prepared_data(tmp_path, tiny_model_dir, tiny_dataset_dir, capsys, monkeypatch):
    from onpolicy_lib.config import TrainConfig
    from onpolicy_lib.training import train

    monkeypatch.setenv("ONPOLICY_QUANT_PREPARED", str(tmp_path / "prepared"))
    paths = []
    for seed in (1, 2):
        cfg = TrainConfig(model_name=str(tiny_model_dir), dataset_name=str(tiny_dataset_dir), group_size=32,
                          max_steps=1, max_length=96, max_new_tokens=6, min_completion_tokens=4, seed=seed,
                          heldout_eval_size=2, output_dir=str(tmp_path / f"seed-{seed}"), device="cpu")
        run = train(cfg)
        paths.append(json.loads((run.path / "config.json").read_text())["resolved"]["prepared_data"])
    log = capsys.readouterr().out
    assert "prepared data: tokenized and filtered" in log and "prepared data: reused" in log
    assert paths[0] == paths[1]
