"""The step benchmark runs end to end, and each fast path equals the straightforward computation.

* ``python -m onpolicy_lib.bench`` on a tiny model: every figure is printed and positive
  (no timing assertions: the speed targets are reported by the benchmark, not tested);
* the lean divergence == the reference formula and an independent float64 computation,
  values and gradients, for every beta, chunked, on selected rows, in bf16;
* rollouts from materialised weights == rollouts from the fake-quantized forward (sampled
  tokens and every step's logits), and KV-cached logits == a full-sequence forward;
* our loss (completion block, lean divergence) == stock TRL's ``GKDTrainer.compute_loss``
  (full sequences, its collator's layout) on the same batch, losses and gradients.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import chat_rows

from onpolicy_lib import bench, distill
from onpolicy_lib.distill import DistillCollator, generalized_jsd, generalized_jsd_reference
from onpolicy_lib.quantization import materialized_fake_quant, prepare_qat
from onpolicy_lib.student import build_student

GROUP = 32
BETAS = [0.0, 0.3, 0.5, 1.0]


# ---------------------------------------------------------------------------- end to end
def test_bench_runs_end_to_end(tiny_model_dir, tiny_dataset_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = bench.main(["--model", str(tiny_model_dir), "--dataset", str(tiny_dataset_dir), "--group-size",
                          str(GROUP), "--max-length", "64", "--max-new-tokens", "4", "--steps", "1", "--warmup", "0",
                          "--trl-steps", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["ratios"] == pytest.approx(results["ratios"])
    expected = {"floor", "floor_lambda1_shape", "optimizer", "ours_0", "ours_1", "trl_0", "trl_1", "trl_nockpt_0",
                "trl_nockpt_1", "gen_plain", "gen_student", "gen_materialised", "gen_fake_quant", "quantize_once"}
    assert set(saved["timings"]) == expected
    for name, timing in saved["timings"].items():
        assert len(timing["seconds"]) == 1 and timing["median_s"] > 0, name
        assert timing["peak_mb"] > 0, name
    for name in ("ours_1", "trl_1", "trl_nockpt_1"):  # the lambda=1 contenders really generated
        assert saved["timings"][name]["parts_median_s"]["rollout"] > 0, name
    assert saved["timings"]["ours_0"]["parts_median_s"]["rollout"] == 0
    # Equal work: every lambda=1 contender scored exactly batch x max_new_tokens completion tokens,
    # every lambda=0 contender the dataset completions.
    scored = {name: timing["parts_median_s"]["scored_tokens"] for name, timing in saved["timings"].items()
              if "scored_tokens" in timing["parts_median_s"]}
    assert scored["ours_1"] == scored["trl_1"] == scored["trl_nockpt_1"] == 2 * 4
    assert scored["ours_0"] == scored["trl_0"] == scored["trl_nockpt_0"] == sum(saved["batch"]["completion_tokens"])
    assert all(v > 0 for v in saved["tokens_per_s"].values())
    assert all(v is not None and v > 0 for v in saved["ratios"].values())
    for label in ("floor", "ours, lambda=0", "ours, lambda=1", "stock TRL GKDTrainer, lambda=1", "tokens/s",
                  "ours lambda=0 / floor", "ours lambda=1 / ours lambda=0", "TRL lambda=1 / ours lambda=1",
                  "plain / our student generation tokens/s", "peak MB"):
        assert label in printed, label


def test_bench_skip_trl(tiny_model_dir, tiny_dataset_dir, capsys):
    results = bench.main(["--model", str(tiny_model_dir), "--dataset", str(tiny_dataset_dir), "--group-size",
                          str(GROUP), "--max-length", "64", "--max-new-tokens", "2", "--steps", "1", "--warmup", "0",
                          "--skip-trl"])
    assert "trl_1" not in results["timings"] and results["ratios"]["trl_lambda1_over_ours_lambda1"] is None
    assert "skipped" in capsys.readouterr().out


def test_fixed_batch_is_the_first_chats_that_fit(tokenizer, tiny_dataset_dir):
    features, chats = bench.fixed_batch(tokenizer, str(tiny_dataset_dir), 3, 64, 4)
    again, _ = bench.fixed_batch(tokenizer, str(tiny_dataset_dir), 3, 64, 4)
    assert features == again and len(features) == 3 and len(chats) == 3
    for f, chat in zip(features, chats, strict=True):
        text = tokenizer.decode(f["completion_ids"], skip_special_tokens=True)
        assert text == chat["messages"][-1]["content"]


# ---------------------------------------------------------------------------- the lean divergence
def float64_divergence(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row generalized JSD from the definition, in float64 (independent of both implementations)."""
    ps, pt = torch.softmax(s.double(), -1), torch.softmax(t.double(), -1)
    if beta == 0:
        return (pt * (pt.log() - ps.log())).sum(-1)
    if beta == 1:
        return (ps * (ps.log() - pt.log())).sum(-1)
    m = beta * pt + (1 - beta) * ps
    return beta * (pt * (pt / m).log()).sum(-1) + (1 - beta) * (ps * (ps / m).log()).sum(-1)


def value_and_grad(fn, s: torch.Tensor, t: torch.Tensor, weights: torch.Tensor):
    s = s.detach().clone().requires_grad_(True)
    values = fn(s, t)
    (values * weights).sum().backward()  # non-uniform upstream gradient, not just a mean
    return values.detach(), s.grad


@pytest.mark.parametrize("beta", BETAS)
def test_lean_divergence_equals_reference_and_float64(beta, monkeypatch):
    monkeypatch.setattr(distill, "CHUNK_ELEMENTS", 3 * 37)  # 3 rows per slice: many slices
    torch.manual_seed(0)
    s, t = torch.randn(2, 9, 37) * 3, torch.randn(2, 9, 37) * 3
    mask = torch.rand(2, 9) < 0.6
    mask[0, :4] = True  # a run longer than a slice
    rows = mask.flatten().nonzero().squeeze(1)
    weights = torch.rand(rows.numel())

    lean = value_and_grad(lambda a, b: generalized_jsd(a, b, beta, rows=rows), s, t, weights)
    ref = value_and_grad(lambda a, b: generalized_jsd_reference(a[mask], b[mask], beta), s, t, weights)
    exact = value_and_grad(lambda a, b: float64_divergence(a[mask], b[mask], beta), s.double(), t.double(),
                           weights.double())
    torch.testing.assert_close(lean[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lean[1], ref[1], rtol=1e-5, atol=1e-7)
    # Against float64: as close as float32 arithmetic allows.
    torch.testing.assert_close(lean[0].double(), exact[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lean[1].double(), exact[1], rtol=1e-4, atol=1e-6)
    assert (lean[1].flatten(0, 1)[~mask.flatten()] == 0).all()  # unscored rows get no gradient


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_lean_divergence_any_row_order_duplicates_and_bf16(beta):
    torch.manual_seed(1)
    s, t = torch.randn(6, 23) * 2, torch.randn(6, 23) * 2
    rows = torch.tensor([4, 1, 2, 2, 5])  # unsorted, one row twice
    weights = torch.rand(5)
    lean = value_and_grad(lambda a, b: generalized_jsd(a, b, beta, rows=rows), s, t, weights)
    ref = value_and_grad(lambda a, b: generalized_jsd_reference(a[rows], b[rows], beta), s, t, weights)
    torch.testing.assert_close(lean, ref, rtol=1e-5, atol=1e-7)

    # bf16 logits (the GPU path): computed in fp32 like the reference, gradient in the logits' dtype.
    sb, tb = s.bfloat16(), t.bfloat16()
    lean = value_and_grad(lambda a, b: generalized_jsd(a, b, beta), sb, tb, torch.ones(6))
    ref = value_and_grad(lambda a, b: generalized_jsd_reference(a, b, beta), sb, tb, torch.ones(6))
    assert lean[0].dtype == torch.float32 and lean[1].dtype == torch.bfloat16
    torch.testing.assert_close(lean[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lean[1].float(), ref[1].float(), rtol=1e-2, atol=1e-4)


def test_lean_divergence_without_grad_and_refuses_a_trainable_teacher():
    s, t = torch.randn(3, 11), torch.randn(3, 11)
    with torch.no_grad():
        torch.testing.assert_close(generalized_jsd(s, t, 0.5), generalized_jsd_reference(s, t, 0.5))
    with torch.inference_mode():  # a teacher forward under inference mode, as the reference allows
        t_inference = t.clone()
    weights = torch.rand(3)
    lean = value_and_grad(lambda a, b: generalized_jsd(a, b, 0.5), s, t_inference, weights)
    ref = value_and_grad(lambda a, b: generalized_jsd_reference(a, b, 0.5), s, t_inference, weights)
    torch.testing.assert_close(lean, ref, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="teacher"):
        generalized_jsd(s, t.requires_grad_(), 0.5)


# ---------------------------------------------------------------------------- rollouts
def test_materialised_rollout_equals_fake_quant_rollout(tokenizer, tiny_model):
    student = prepare_qat(copy.deepcopy(tiny_model), "int4", GROUP).eval()
    prompts = tokenizer.apply_chat_template([r["messages"][:1] for r in chat_rows(3)], add_generation_prompt=True,
                                            padding=True, return_tensors="pt", return_dict=True)
    kwargs = dict(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"], do_sample=True,
                  temperature=0.9, top_k=0, top_p=1.0, max_new_tokens=12, min_new_tokens=12,
                  pad_token_id=tokenizer.pad_token_id, output_logits=True, return_dict_in_generate=True)

    def sample(materialise: bool):
        torch.manual_seed(5)
        with torch.no_grad(), materialized_fake_quant(student) if materialise else torch.no_grad():
            return student.generate(**kwargs)

    fast, plain = sample(True), sample(False)
    assert torch.equal(fast.sequences, plain.sequences)
    for a, b in zip(fast.logits, plain.logits, strict=True):
        assert torch.equal(a, b)  # bit for bit, every generated position

    # The KV-cached logits are those of a plain full-sequence fake-quant forward on the result.
    width = prompts["input_ids"].shape[1]
    mask = torch.cat([prompts["attention_mask"], torch.ones(3, 12, dtype=torch.long)], 1)
    with torch.no_grad():
        full = student(input_ids=fast.sequences, attention_mask=mask,
                       position_ids=distill.position_ids_from_mask(mask)).logits
    torch.testing.assert_close(torch.stack(fast.logits, 1), full[:, width - 1:-1], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- ours vs stock TRL
def features_of(tokenizer, n: int = 3) -> list[dict]:
    rows = []
    for row in chat_rows(n):
        prompt = tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        completion = tokenizer(row["messages"][1]["content"], add_special_tokens=False)["input_ids"]
        rows.append({"prompt_ids": list(prompt), "completion_ids": completion + [tokenizer.eos_token_id]})
    rows[1]["prompt_ids"] = rows[1]["prompt_ids"][:2] + rows[1]["prompt_ids"][-5:]  # different lengths: padding
    rows[2]["completion_ids"] = rows[2]["completion_ids"][:3]
    return rows


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_our_loss_equals_stock_trl_loss(tmp_path, tokenizer, tiny_model, beta):
    features = features_of(tokenizer)
    settings = bench.Settings(beta=beta, batch_size=3, max_length=128, max_new_tokens=4)
    device = torch.device("cpu")
    teacher = copy.deepcopy(tiny_model).requires_grad_(False)
    chats = chat_rows(3)

    def student():
        return build_student(tiny_model, "int4", GROUP)

    ours = bench.our_trainer(student(), teacher, tokenizer, settings, device, str(tmp_path / "o"), 0.0)
    trl = bench.trl_trainer(student(), teacher, tokenizer, settings, device, str(tmp_path / "t"), 0.0, chats)
    ours_batch = DistillCollator(tokenizer.pad_token_id)(features)
    trl_batch = bench.trl_batch(features, tokenizer, settings.max_length)
    # Same tokens, different layouts: ours [pad.. prompt | completion ..pad], TRL's left-padded sequences.
    assert not torch.equal(ours_batch["input_ids"], trl_batch["input_ids"])
    assert (trl_batch["labels"] != -100).sum() == (ours_batch["labels"] != -100).sum()

    loss_ours = ours.compute_loss(ours.model, ours_batch)
    loss_ours.backward()
    loss_trl = trl.compute_loss(trl.model, {k: v for k, v in trl_batch.items() if k != "byte_offsets"})
    loss_trl.backward()
    torch.testing.assert_close(loss_ours, loss_trl, rtol=1e-5, atol=1e-6)
    assert loss_ours > 0
    grads_ours = dict(ours.model.named_parameters())
    for name, p in trl.model.named_parameters():
        torch.testing.assert_close(grads_ours[name].grad, p.grad, rtol=1e-3, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------- one quantization per step
def lambda1_step(tmp_path, monkeypatch, tokenizer, teacher, fast: bool, lora: bool = False):
    """One on-policy step from a fixed student and seed: the batch the loss saw, the loss, the gradients."""
    from onpolicy_lib.distill import DistillConfig, DistillTrainer

    torch.manual_seed(0)
    student = build_student(teacher, "int4", GROUP, lora_r=4 if lora else None, lora_dropout=0.0)
    if not lora:
        student.requires_grad_(True)  # a copy of the frozen teacher; full fine-tuning trains every weight
    args = DistillConfig(output_dir=str(tmp_path / f"run-{fast}-{lora}"), per_device_train_batch_size=3,
                         learning_rate=1e-3, report_to=[], remove_unused_columns=False, use_cpu=True, lmbda=1.0,
                         beta=0.5, max_new_tokens=6, temperature=1.0, save_strategy="no", seed=0,
                         disable_tqdm=True, fast_rollouts=fast)
    trainer = DistillTrainer(student, teacher, args, processing_class=tokenizer)
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.current_gradient_accumulation_steps = 1
    seen, calls = {}, []
    original = trainer.compute_loss

    def spy(model, inputs, return_outputs=False, num_items_in_batch=None):
        seen.update({k: v.clone() for k, v in inputs.items()})
        return original(model, inputs, return_outputs, num_items_in_batch)

    trainer.compute_loss = spy
    quantizers = [m.weight_fake_quantizer for m in student.modules() if hasattr(m, "weight_fake_quantizer")]
    cls = type(quantizers[0])
    compute = cls.forward

    def counting(self, weight):  # counts real quantizations, not returns of a shared result
        calls.append(1)
        return compute(self, weight)

    monkeypatch.setattr(cls, "forward", counting)
    torch.manual_seed(11)
    loss = trainer.training_step(student, DistillCollator(tokenizer.pad_token_id)(features_of(tokenizer)))
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    assert all("forward" not in q.__dict__ for q in quantizers)  # restored after the step
    monkeypatch.setattr(cls, "forward", compute)
    return seen, loss, grads, len(calls), len(quantizers)


@pytest.mark.parametrize("lora", [False, True])
def test_on_policy_step_quantizes_once_with_identical_samples_loss_and_gradients(tmp_path, monkeypatch, tokenizer,
                                                                                   tiny_model, lora):
    teacher = copy.deepcopy(tiny_model).requires_grad_(False)
    fast = lambda1_step(tmp_path, monkeypatch, tokenizer, teacher, fast=True, lora=lora)
    plain = lambda1_step(tmp_path, monkeypatch, tokenizer, teacher, fast=False, lora=lora)
    # The straightforward path samples from the fake-quant forward (one quantization per layer
    # call: every generated token) and quantizes again in the training forward.
    assert set(fast[0]) == set(plain[0])
    for key in fast[0]:
        assert torch.equal(fast[0][key], plain[0][key]), key
    assert torch.equal(fast[1], plain[1])
    assert fast[2].keys() == plain[2].keys() and fast[2]
    for name in fast[2]:
        assert torch.equal(fast[2][name], plain[2][name]), name
    # The fast step quantized each layer's weight exactly once; the plain one at every token and again to train.
    assert fast[3] == fast[4] > 0
    assert plain[3] > 6 * fast[4]


def test_fake_quantized_once_falls_back_when_the_weight_changes(tiny_model):
    from onpolicy_lib.distill import fake_quantized_once

    student = prepare_qat(copy.deepcopy(tiny_model), "int4", GROUP)
    layer = next(m for m in student.modules() if hasattr(m, "weight_fake_quantizer"))
    with fake_quantized_once(student) as shared:
        assert shared > 0
        first = layer.weight_fake_quantizer(layer.weight)
        assert layer.weight_fake_quantizer(layer.weight) is first  # reused
        assert layer.weight_fake_quantizer(layer.weight.detach().clone()) is not first  # another tensor
        with torch.no_grad():
            layer.weight.mul_(2)
        again = layer.weight_fake_quantizer(layer.weight)  # changed in place: computed afresh
        assert again is not first and not torch.equal(again, first)
    assert "forward" not in layer.weight_fake_quantizer.__dict__
