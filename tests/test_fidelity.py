"""Fidelity metrics and perplexity against independent, one-example-at-a-time computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import chat_rows
from datasets import Dataset

from onpolicy_lib.data import tokenize_for_distillation
from onpolicy_lib.fidelity import FidelityConfig, measure_fidelity
from onpolicy_lib.perplexity import sliding_window_perplexity
from onpolicy_lib.quantization import quantize_ptq


@pytest.fixture
def heldout(tokenizer):
    ds, _ = tokenize_for_distillation(Dataset.from_list(chat_rows(5)), tokenizer, max_length=96,
                                      min_completion_tokens=4)
    return ds


@pytest.fixture
def student(tiny_model):
    return quantize_ptq(copy.deepcopy(tiny_model), "int4", 32).eval()


def probs(model, ids):
    with torch.no_grad():
        return torch.softmax(model(torch.tensor([ids])).logits[0].double(), -1)


def test_teacher_forced_metrics(tiny_model, student, tokenizer, heldout):
    got = measure_fidelity(tiny_model, student, tokenizer, heldout, FidelityConfig(samples=5, batch_size=2))
    kl_sum = agree_sum = n = 0.0
    for row in heldout:
        ids = list(row["prompt_ids"]) + list(row["completion_ids"])
        p_t, p_s = probs(tiny_model, ids), probs(student, ids)
        positions = range(len(row["prompt_ids"]) - 1, len(ids) - 1)  # these predict the completion
        for i in positions:
            kl_sum += float((p_t[i] * (p_t[i].log() - p_s[i].log())).sum())
            agree_sum += float(p_t[i].argmax() == p_s[i].argmax())
            n += 1
    assert got["tokens"]["dataset"] == n
    assert got["forward_kl"] == pytest.approx(kl_sum / n, rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(agree_sum / n, abs=1e-9)
    assert got["forward_kl"] > 0 and 0 < got["top1_agreement"] < 1


def test_generated_metrics(tiny_model, student, tokenizer, heldout):
    cfg = FidelityConfig(samples=4, batch_size=4, max_new_tokens=6, seed=3)
    got = measure_fidelity(tiny_model, student, tokenizer, heldout, cfg)
    eos = tokenizer.eos_token_id
    # Greedy decoding is deterministic: redo it one example at a time, without padding.
    nll_sum = n = 0.0
    for row in heldout.select(range(4)):
        prompt = list(row["prompt_ids"])
        out = student.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=[eos],
                               pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        if eos in out:
            out = out[: out.index(eos) + 1]
        p_t = probs(tiny_model, prompt + out)
        for k, tok in enumerate(out):
            nll_sum -= math.log(float(p_t[len(prompt) - 1 + k, tok]))
            n += 1
    assert got["tokens"]["greedy"] == n
    assert got["teacher_nll_of_student_greedy"] == pytest.approx(nll_sum / n, rel=1e-4)
    assert got["reverse_kl_on_policy"] > 0
    assert len(got["per_example"]) == 4


def test_identical_models_have_perfect_fidelity(tiny_model, tokenizer, heldout):
    got = measure_fidelity(tiny_model, tiny_model, tokenizer, heldout, FidelityConfig(samples=3))
    assert got["forward_kl"] == pytest.approx(0, abs=1e-6)
    assert got["reverse_kl_on_policy"] == pytest.approx(0, abs=1e-6)
    assert got["top1_agreement"] == 1.0


def brute_force_perplexity(model, ids, max_length, stride):
    """Score token t with exactly the context the sliding window gives it."""
    nll, prev_end = [], 1  # token 0 has no context and is not scored
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        for t in range(prev_end, end):
            p = probs(model, ids[begin:t + 1])
            nll.append(-math.log(float(p[t - begin - 1, ids[t]])))
        prev_end = end
        if end == len(ids):
            break
    return math.exp(sum(nll) / len(nll)), len(nll)


@pytest.mark.parametrize(("max_length", "stride"), [(64, 64), (16, 8), (12, 5)])
def test_sliding_window_perplexity(tiny_model, tokenizer, max_length, stride):
    text = "what is 3 + 4? it is 7. and 5 + 6 = 11, so the answer is eleven."
    got = sliding_window_perplexity(tiny_model, tokenizer, text, max_length=max_length, stride=stride)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    expected, scored = brute_force_perplexity(tiny_model, ids, max_length, stride)
    assert got["tokens_scored"] == scored == len(ids) - 1
    assert got["perplexity"] == pytest.approx(expected, rel=1e-4)


def test_perplexity_rejects_bad_windows(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="stride"):
        sliding_window_perplexity(tiny_model, tokenizer, "abc", max_length=8, stride=9)


def test_length_matched_and_per_source_metrics(tiny_model, student, tokenizer):
    rows = [{**r, "source": "math" if i % 2 else "qa"} for i, r in enumerate(chat_rows(6))]
    heldout, _ = tokenize_for_distillation(Dataset.from_list(rows), tokenizer, max_length=96,
                                           min_completion_tokens=4)
    window = 3
    got = measure_fidelity(tiny_model, student, tokenizer, heldout,
                           FidelityConfig(samples=6, batch_size=4, max_new_tokens=window))
    kl_sum = agree_sum = n = 0.0
    by_source: dict[str, list[float]] = {}
    for row in heldout:
        ids = list(row["prompt_ids"]) + list(row["completion_ids"])
        p_t, p_s = probs(tiny_model, ids), probs(student, ids)
        first = len(row["prompt_ids"]) - 1
        for i in range(first, min(first + window, len(ids) - 1)):  # the first `window` completion positions
            kl = float((p_t[i] * (p_t[i].log() - p_s[i].log())).sum())
            kl_sum += kl
            agree_sum += float(p_t[i].argmax() == p_s[i].argmax())
            n += 1
        full = [float((p_t[i] * (p_t[i].log() - p_s[i].log())).sum()) for i in range(first, len(ids) - 1)]
        by_source.setdefault(row["source"], []).extend(full)
    assert got["tokens"]["matched"] == n < got["tokens"]["dataset"]
    assert got["forward_kl_matched"] == pytest.approx(kl_sum / n, rel=1e-4)
    assert got["top1_agreement_matched"] == pytest.approx(agree_sum / n, abs=1e-9)
    assert set(got["by_source"]) == {"math", "qa"}
    for source, values in by_source.items():
        assert got["by_source"][source]["forward_kl"] == pytest.approx(sum(values) / len(values), rel=1e-4)
    assert {e["source"] for e in got["per_example"]} == {"math", "qa"}


def test_fidelity_rollouts_use_the_run_settings():
    cfg = FidelityConfig.for_run({"max_new_tokens": 7, "min_new_tokens": 2, "temperature": 0.5, "lmbda": 1}, 12)
    assert (cfg.samples, cfg.max_new_tokens, cfg.min_new_tokens, cfg.temperature) == (12, 7, 2, 0.5)


def test_rollouts_stop_on_every_end_of_sequence_id(tiny_model, student, tokenizer, heldout, monkeypatch):
    # Qwen3's generation config lists two end-of-sequence ids; the tokenizer names one.
    from onpolicy_lib import fidelity
    from onpolicy_lib.batches import completion_mask_from_generation, eos_token_ids

    second = tokenizer.convert_tokens_to_ids(".")
    for model in (tiny_model, student):
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, second]
    both = sorted({tokenizer.eos_token_id, second})
    assert eos_token_ids(student, tokenizer) == both
    ids = torch.tensor([[7, second, 8, 9], [7, 8, tokenizer.eos_token_id, 9]])
    assert completion_mask_from_generation(ids, both).tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]
    seen = []
    original = fidelity.generate_completions

    def spy(model, inputs, pad, eos_ids, **kwargs):
        seen.append(list(eos_ids))
        return original(model, inputs, pad, eos_ids, **kwargs)

    monkeypatch.setattr(fidelity, "generate_completions", spy)
    measure_fidelity(tiny_model, student, tokenizer, heldout, FidelityConfig(samples=2, max_new_tokens=4))
    assert len(seen) == 2 and all(ids == both for ids in seen)  # sampled and greedy rollouts


def test_length_ordered_batches_score_every_example_as_held_out_order_does(tiny_model, student, tokenizer):
    """Batching by length changes which rows share a batch (so the sampled completions), nothing else:
    the teacher-forced and greedy metrics of each example are the held-out order's, listed in that order."""
    rows = chat_rows(6)
    for i, row in enumerate(rows):  # prompts of different lengths, not in length order
        row["messages"][0]["content"] += " please" * ((i * 5) % 6)
    heldout, _ = tokenize_for_distillation(Dataset.from_list(rows), tokenizer, max_length=128,
                                           min_completion_tokens=4)
    lengths = [len(p) for p in heldout["prompt_ids"]]
    assert lengths != sorted(lengths)
    got = {order: measure_fidelity(tiny_model, student, tokenizer, heldout,
                                   FidelityConfig(samples=6, batch_size=2, batch_order=order))
           for order in ("length", "rows")}
    length, rows = got["length"]["per_example"], got["rows"]["per_example"]
    assert [e["id"] for e in length] == [e["id"] for e in rows] == heldout["id"]
    for metric in ("forward_kl", "top1_agreement", "teacher_nll_of_student_greedy"):
        assert [e[metric] for e in length] == pytest.approx([e[metric] for e in rows], rel=1e-4, abs=1e-6), metric
    assert got["length"]["config"]["batch_order"] == "length"
    with pytest.raises(ValueError, match="batch_order"):
        measure_fidelity(tiny_model, student, tokenizer, heldout, FidelityConfig(samples=2, batch_order="random"))
