"""Generation quality of one model: correctness by a checker, ROUGE-L, the teacher's NLL of the output,
per example and summarised per task and overall; the fraction of the teacher-to-PTQ gap recovered."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model

from onpolicy_lib.generation_eval import evaluate_generation, gap_recovered, gaps_recovered, teacher_nll


@dataclass
class Item:
    task: str
    id: str
    messages: list
    reference: str | None
    check: str | None


@dataclass
class Result:
    correct: bool | None
    extracted: object
    detail: str


def fake_check(item, completion):
    if item.check is None:
        return Result(None, None, "no checker")
    return Result("a" in completion, completion[:3] or None, "contains 'a'")


def items():
    out = []
    for i in range(5):
        out.append(Item("sums", f"s{i}", [{"role": "user", "content": f"what is {i} + 2?"}], f"{i} + 2 = {i + 2}",
                        "contains_a"))
    for i in range(3):
        out.append(Item("chat", f"c{i}", [{"role": "user", "content": "say hi" + "!" * i}], None, None))
    return out


def direct_nll(teacher, prompt, completion):
    ids = torch.tensor([prompt + completion])
    logp = F.log_softmax(teacher(input_ids=ids).logits[0].float(), -1)
    positions = range(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return -sum(logp[p, t].item() for p, t in zip(positions, completion, strict=True)) / len(completion)


def test_teacher_nll_is_the_direct_mean(tokenizer):
    """Batched, padded, longest first: each value is the teacher's mean NLL of the completion tokens
    computed on that prompt + completion alone."""
    teacher = make_model(len(tokenizer), seed=1)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    completions = [[20, 21, 3], [22], [23, 24, 25, 26]]
    got = teacher_nll(teacher, 0, prompts, completions, batch_size=2)
    for value, p, c in zip(got, prompts, completions, strict=True):
        assert value == pytest.approx(direct_nll(teacher, p, c), rel=1e-5)


def test_evaluate_generation_records_and_summaries(tokenizer):
    model, teacher = make_model(len(tokenizer)), make_model(len(tokenizer), seed=1)
    result = evaluate_generation(model, tokenizer, items(), teacher=teacher, max_new_tokens=10, temperature=1.2,
                                 samples=2, seed=3, batch_size=3, check_fn=fake_check)
    json.dumps(result)  # it goes into eval.json
    greedy, sampled = result["greedy"], result["sampled"]
    assert [(r["task"], r["id"]) for r in greedy["per_example"]] == [(i.task, i.id) for i in items()]
    assert [(r["id"], r["sample"]) for r in sampled["per_example"][:4]] == [("s0", 0), ("s0", 1), ("s1", 0), ("s1", 1)]
    prompts = [tokenizer.apply_chat_template(i.messages, add_generation_prompt=True, tokenize=True, return_dict=False)
               for i in items()]
    for record, item, prompt in zip(greedy["per_example"], items(), prompts, strict=True):
        ids = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        assert record["tokens"] >= len(ids) and record["prompt_tokens"] == len(prompt)
        assert (record["correct"] is None) == (item.check is None)
        assert (record["rouge_l"] is None) == (item.reference is None)
        assert 0 <= (record["rouge_l"] or 0) <= 1 and record["teacher_nll"] > 0
        assert record["hit_cap"] == (record["tokens"] == 10 and not record["completion"].endswith("<|im_end|>"))
    # The teacher NLL is of the generated tokens themselves (the end token included), not of re-encoded text.
    first = greedy["per_example"][0]
    from onpolicy_lib.generation import generate_texts
    tokens = generate_texts(model, tokenizer, [items()[0].messages], max_new_tokens=10)[0].token_ids
    assert first["teacher_nll"] == pytest.approx(direct_nll(teacher, prompts[0], tokens), rel=1e-5)

    summary = greedy["summary"]
    sums = [r for r in greedy["per_example"] if r["task"] == "sums"]
    assert summary["by_task"]["sums"]["rouge_l"]["mean"] == pytest.approx(sum(r["rouge_l"] for r in sums) / 5)
    assert summary["by_task"]["chat"]["correct"] == {"mean": None, "n": 0, "sem": None}
    assert summary["all"]["correct"]["n"] == 5 and summary["all"]["teacher_nll"]["n"] == 8
    assert summary["all"]["tokens"]["mean"] == pytest.approx(sum(r["tokens"] for r in greedy["per_example"]) / 8)
    assert "per example" in summary["weighting"]
    # Per example: each example's mean over its two samples, then the mean over examples.
    per_example = [(sampled["per_example"][2 * k]["teacher_nll"] + sampled["per_example"][2 * k + 1]["teacher_nll"]) / 2
                   for k in range(8)]
    assert sampled["summary"]["all"]["teacher_nll"]["mean"] == pytest.approx(sum(per_example) / 8)
    assert sampled["summary"]["all"]["teacher_nll"]["sem"] == pytest.approx(
        torch.tensor(per_example).std().item() / math.sqrt(8), rel=1e-4)


def test_sampling_is_reproducible_and_teacher_optional(tokenizer):
    model = make_model(len(tokenizer))
    runs = [evaluate_generation(model, tokenizer, items(), teacher=None, max_new_tokens=8, temperature=1.0, samples=1,
                                seed=0, batch_size=b, check_fn=fake_check) for b in (2, 8)]
    assert runs[0]["sampled"]["per_example"] == runs[1]["sampled"]["per_example"]
    assert runs[0]["greedy"]["summary"]["all"]["teacher_nll"]["n"] == 0
    greedy_only = evaluate_generation(model, tokenizer, items()[:2], teacher=None, max_new_tokens=4, temperature=0.0,
                                      samples=0, check_fn=fake_check)
    assert "sampled" not in greedy_only


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"items": []}, "items is empty"),
    ({"items": [object()]}, r"items\[0\] lacks task"),
    ({"items": items()[:1] * 2}, "distinct"),
    ({"samples": -1}, "samples"),
    ({"samples": 1, "temperature": 0.0}, "temperature"),
])
def test_bad_input_fails_early(tokenizer, kwargs, message):
    settings = {"items": items()[:2], "teacher": None, "max_new_tokens": 4, "temperature": 1.0, "check_fn": fake_check}
    settings |= kwargs
    with pytest.raises(ValueError, match=message):
        evaluate_generation(make_model(len(tokenizer)), tokenizer, **settings)


def test_gap_recovered():
    assert gap_recovered(0.5, 0.2, 0.8) == pytest.approx(0.5)  # higher is better
    assert gap_recovered(2.5, 3.0, 2.0) == pytest.approx(0.5)  # lower is better (teacher NLL)
    assert gap_recovered(0.2, 0.2, 0.8) == 0 and gap_recovered(0.8, 0.2, 0.8) == 1
    assert gap_recovered(0.1, 0.2, 0.8) < 0 and gap_recovered(0.9, 0.2, 0.8) > 1
    assert gap_recovered(0.5, 0.4, 0.4) is None  # no gap
    assert gap_recovered(None, 0.2, 0.8) is None and gap_recovered(math.nan, 0.2, 0.8) is None


def test_gaps_recovered_per_metric_and_task():
    def result(rouge, nll, correct):
        part = {"rouge_l": {"mean": rouge}, "teacher_nll": {"mean": nll}, "correct": {"mean": correct}}
        return {"greedy": {"summary": {"all": part, "by_task": {"sums": part}}}}

    out = gaps_recovered(result(0.5, 2.5, None), result(0.2, 3.0, 0.1), result(0.8, 2.0, 0.3))
    assert out["all"] == {"rouge_l": pytest.approx(0.5), "teacher_nll": pytest.approx(0.5), "correct": None}
    assert out["by_task"]["sums"] == out["all"]
