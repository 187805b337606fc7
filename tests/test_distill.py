"""GKD semantics, each checked against an independent computation.

* beta=0 / beta=1 losses are forward / reverse KL (the divergence itself: test_divergence.py);
* lmbda=1 batches are the student's own samples, lmbda=0 batches the dataset's
  completions, seq_kd batches the teacher's samples;
* the sliced, left-padded loss equals a plain full-sequence computation.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import chat_rows, make_gemma_model, make_model
from datasets import Dataset

from onpolicy_lib.batches import IGNORE_INDEX, DistillCollator, position_ids_from_mask
from onpolicy_lib.distill import DistillConfig, DistillTrainer
from onpolicy_lib.quantization import materialized_fake_quant, prepare_qat

GROUP = 32


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, in float64 from the definition."""
    p = torch.softmax(p_logits.double(), -1)
    q = torch.softmax(q_logits.double(), -1)
    return (p * (p.log() - q.log())).sum(-1)


# ---------------------------------------------------------------------------- trainer fixtures
def tokenized(tokenizer, n=8) -> Dataset:
    rows = []
    for row in chat_rows(n):
        prompt = tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"]
        completion = tokenizer(row["messages"][1]["content"], add_special_tokens=False)["input_ids"]
        rows.append({"prompt_ids": prompt, "completion_ids": completion + [tokenizer.eos_token_id]})
    # Different prompt lengths so the batch really is left-padded.
    rows[1]["prompt_ids"] = rows[1]["prompt_ids"][:3] + rows[1]["prompt_ids"][-6:]
    return Dataset.from_list(rows)


def make_trainer(tmp_path, tokenizer, teacher, **overrides) -> DistillTrainer:
    student = prepare_qat(copy.deepcopy(teacher), "int4", GROUP).train()
    settings = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=2,
                    learning_rate=1e-3, report_to=[], remove_unused_columns=False, use_cpu=True,
                    max_new_tokens=8, temperature=1.0, save_strategy="no", seed=0, disable_tqdm=True)
    args = DistillConfig(**{**settings, **overrides})
    return DistillTrainer(student, teacher, args, processing_class=tokenizer,
                          train_dataset=tokenized(tokenizer))


def first_batch(trainer: DistillTrainer) -> dict[str, torch.Tensor]:
    return trainer.data_collator([trainer.train_dataset[i] for i in range(2)])


def captured_step(trainer: DistillTrainer, batch: dict) -> dict[str, torch.Tensor]:
    """Run one training step and return the batch the loss actually saw."""
    seen = {}
    original = trainer.compute_loss

    def spy(model, inputs, return_outputs=False, num_items_in_batch=None):
        seen.update({k: v.clone() for k, v in inputs.items()})
        return original(model, inputs, return_outputs, num_items_in_batch)

    trainer.compute_loss = spy
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop we bypass
    trainer.training_step(trainer.model, dict(batch))
    return seen


def reference_loss(student, teacher, batch, beta) -> torch.Tensor:
    """Full-sequence forward with explicit shift and masking: no slicing, no logits_to_keep."""
    pos = position_ids_from_mask(batch["attention_mask"])
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "position_ids": pos}
        s, t = student(**inputs).logits, teacher(**inputs).logits
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    s, t = s[:, :-1][mask], t[:, :-1][mask]
    if beta == 0:
        return kl(t, s).mean()
    return kl(s, t).mean()


def test_lmbda0_trains_on_dataset_completions(tmp_path, tokenizer, tiny_model):
    trainer = make_trainer(tmp_path, tokenizer, tiny_model, lmbda=0.0, beta=0.0)
    trainer.model.generate = lambda *a, **k: pytest.fail("lmbda=0 must not sample from the student")
    batch = first_batch(trainer)
    seen = captured_step(trainer, batch)
    assert torch.equal(seen["input_ids"], batch["input_ids"])
    assert torch.equal(seen["labels"], batch["labels"])
    assert trainer.stats["batches_on_policy"] == 0 and trainer.stats["tokens_generated"] == 0


def sample(model, batch, tokenizer, seed: int) -> torch.Tensor:
    """What the trainer's rollout should sample: plain ``generate`` with its settings, seeded."""
    torch.manual_seed(seed)
    return model.generate(
        input_ids=batch["prompt_ids"], attention_mask=batch["prompt_attention_mask"], do_sample=True,
        temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id])


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_lmbda1_trains_on_student_samples_with_the_right_kl(tmp_path, tokenizer, tiny_model, beta):
    trainer = make_trainer(tmp_path, tokenizer, tiny_model, lmbda=1.0, beta=beta)
    batch = first_batch(trainer)
    student_before = copy.deepcopy(trainer.model).eval()
    torch.manual_seed(123)
    seen = captured_step(trainer, batch)

    # Independently: the same sampler, seeded the same, on the plain fake-quantized student
    # (no materialised weights) must produce exactly the completions the loss saw.
    expected = sample(student_before, batch, tokenizer, seed=123)
    width_p = batch["prompt_ids"].shape[1]
    mask = seen["attention_mask"][:, width_p:].bool()
    generated = expected[:, width_p:]
    assert torch.equal(seen["input_ids"][:, width_p:][mask], generated[:, : mask.shape[1]][mask])
    assert mask.sum() > 0
    assert not torch.equal(seen["input_ids"], batch["input_ids"])  # not the dataset's completions
    assert trainer.stats["batches_on_policy"] == 1
    assert trainer.stats["tokens_generated"] == int(mask.sum())

    # And the loss is the requested KL on those tokens, computed from full-sequence logits.
    loss = trainer.distillation_loss(student_before, seen)
    torch.testing.assert_close(loss.double(), reference_loss(student_before, tiny_model, seen, beta),
                               rtol=1e-4, atol=1e-6)


def test_seq_kd_trains_on_teacher_samples(tmp_path, tokenizer, tiny_model):
    trainer = make_trainer(tmp_path, tokenizer, tiny_model, lmbda=0.0, seq_kd=True)
    batch = first_batch(trainer)
    torch.manual_seed(7)
    seen = captured_step(trainer, batch)
    expected = sample(tiny_model, batch, tokenizer, seed=7)
    width_p = batch["prompt_ids"].shape[1]
    mask = seen["attention_mask"][:, width_p:].bool()
    assert torch.equal(seen["input_ids"][:, width_p:][mask], expected[:, width_p:][:, : mask.shape[1]][mask])
    assert trainer.stats["batches_seq_kd"] == 1 and trainer.stats["batches_on_policy"] == 0


def test_off_policy_loss_equals_full_sequence_kl(tmp_path, tokenizer, tiny_model):
    trainer = make_trainer(tmp_path, tokenizer, tiny_model, lmbda=0.0, beta=0.0)
    batch = first_batch(trainer)
    assert (batch["prompt_attention_mask"] == 0).any(), "the batch should contain left padding"
    loss = trainer.distillation_loss(trainer.model.eval(), batch)
    torch.testing.assert_close(loss.double(), reference_loss(trainer.model, tiny_model, batch, 0.0),
                               rtol=1e-4, atol=1e-6)
    assert loss > 0  # the int4 student really differs from its teacher


def test_left_padding_does_not_change_logits(tokenizer, tiny_model):
    collate = DistillCollator(tokenizer.pad_token_id)
    rows = tokenized(tokenizer)
    batch = collate([rows[0], rows[1]])
    pos = position_ids_from_mask(batch["attention_mask"])
    with torch.no_grad():
        padded = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            position_ids=pos).logits[1]
        alone = collate([rows[1]])
        single = tiny_model(input_ids=alone["input_ids"]).logits[0]
    real = batch["attention_mask"][1].bool()
    torch.testing.assert_close(padded[real][: single.shape[0]], single[alone["attention_mask"][0].bool()],
                               rtol=1e-4, atol=1e-5)


def test_policy_draws_follow_lmbda_and_are_reproducible(tmp_path, tokenizer, tiny_model):
    def draws(seed):
        trainer = make_trainer(tmp_path, tokenizer, tiny_model, lmbda=0.5, seed=seed)
        out = []
        for step in range(400):
            trainer.state.global_step = step
            out.append(trainer.on_policy_draw() < 0.5)
        return out

    a, b = draws(0), draws(0)
    assert a == b
    assert 0.4 < sum(a) / len(a) < 0.6
    assert draws(1) != a


@pytest.mark.parametrize("disable", [True, False])
def test_dropout_is_disabled_as_trl_does_by_default(tmp_path, tokenizer, tiny_model, disable):
    from onpolicy_lib.student import build_student

    student = build_student(tiny_model, "int4", GROUP, lora_r=4, lora_dropout=0.5)
    args = DistillConfig(output_dir=str(tmp_path / "run"), max_steps=1, report_to=[], use_cpu=True,
                         remove_unused_columns=False, disable_dropout=disable)
    DistillTrainer(student, tiny_model, args, processing_class=tokenizer, train_dataset=tokenized(tokenizer))
    dropouts = [m.p for m in student.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(p == (0.0 if disable else 0.5) for p in dropouts)
    assert DistillConfig(output_dir=str(tmp_path / "d")).disable_dropout  # the default, as TRL's GKDConfig


def test_accumulation_2_x_batch_1_equals_batch_2_on_the_same_examples(tmp_path, tokenizer, tiny_model):
    # The loss is the token mean over the optimizer step's whole window, whatever its micro-batching;
    # the two examples have different completion lengths, so a mean of per-micro-batch means would differ.
    from transformers import TrainerCallback

    class Grads(TrainerCallback):
        def __init__(self):
            self.grads, self.losses = [], []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                self.losses.append(logs["loss"])

    results = []
    for name, batch, accumulation in (("b2", 2, 1), ("a2", 1, 2)):
        teacher = copy.deepcopy(tiny_model).requires_grad_(True)  # a trainer freezes the teacher it is given
        trainer = make_trainer(tmp_path / name, tokenizer, teacher, lmbda=0.0, per_device_train_batch_size=batch,
                               gradient_accumulation_steps=accumulation, max_steps=1, max_grad_norm=0.0,
                               logging_steps=1)
        spy = Grads()
        trainer.add_callback(spy)
        trainer.train()
        results.append(spy)
    (one, two) = results
    assert one.grads[0].keys() == two.grads[0].keys() and one.grads[0]
    for name, grad in one.grads[0].items():
        torch.testing.assert_close(two.grads[0][name], grad, rtol=1e-4, atol=1e-7, msg=name)
    assert two.losses[0] == pytest.approx(one.losses[0], rel=1e-5)
    lengths = [len(trainer.train_dataset[i]["completion_ids"]) for i in range(len(trainer.train_dataset))]
    assert len(set(lengths)) > 1


def test_bf16_rollouts_sample_the_quantized_student_within_bf16_rounding(tmp_path, tokenizer, tiny_model):
    """rollout_dtype='bfloat16' casts the student's quantized weights for the rollout alone: the policy it
    samples is the fake-quant forward's within bf16 rounding, and training state is untouched."""
    from onpolicy_lib.rollouts import cast_for_rollout

    trainer = make_trainer(tmp_path, tokenizer, tiny_model, lmbda=1.0, beta=1.0, rollout_dtype="bfloat16")
    student = trainer.model
    batch = first_batch(trainer)
    params = {name: (p, p.detach().clone()) for name, p in student.named_parameters()}
    with torch.no_grad():
        exact = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with cast_for_rollout(student, torch.bfloat16):
            assert {p.dtype for p in student.parameters()} == {torch.bfloat16}
            cast = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    real = batch["attention_mask"].bool()
    divergence = kl(exact[real], cast[real])
    assert float(divergence.mean()) < 1e-3 and float(divergence.max()) < 1e-2
    assert (exact[real].argmax(-1) == cast[real].argmax(-1)).float().mean() > 0.9
    # Every parameter is the same object with the same values afterwards, quantizers back on.
    for name, p in student.named_parameters():
        assert p is params[name][0] and torch.equal(p, params[name][1]), name
    assert all(m.weight_fake_quantizer.enabled for m in student.modules() if hasattr(m, "weight_fake_quantizer"))
    # And a whole on-policy step runs with it: bf16 samples, fp32 training.
    seen = captured_step(trainer, batch)
    assert trainer.stats["batches_on_policy"] == 1 and seen["input_ids"].shape[1] > batch["prompt_ids"].shape[1]
    assert {p.dtype for p in student.parameters()} == {torch.float32}


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_rollouts_under_bf16_autocast_cast_linear_weights_once_with_the_same_tokens(
        tmp_path, tokenizer, family, monkeypatch):
    """A bf16 run samples its rollouts under autocast, which recasts every linear weight at every token; the
    rollout casts them once instead. The tokens sampled are the same, bit for bit, on Llama and Gemma-3
    (tied heads), and the student's parameters are the same objects afterwards."""
    import onpolicy_lib.distill as distill
    from onpolicy_lib import rollouts

    model = make_model(len(tokenizer)) if family == "llama" else make_gemma_model(len(tokenizer))
    trainer = make_trainer(tmp_path, tokenizer, model, lmbda=1.0, bf16=True, max_new_tokens=12)
    student = trainer.model
    batch = first_batch(trainer)
    params = {name: p for name, p in student.named_parameters()}
    casts = []
    original = rollouts.cast_for_rollout

    def spy(model, dtype, linear_only=False):
        casts.append((dtype, linear_only))
        return original(model, dtype, linear_only)

    monkeypatch.setattr(rollouts, "cast_for_rollout", spy)
    torch.manual_seed(3)
    once = trainer.rollout(student, batch)
    assert casts == [(torch.bfloat16, True)]

    def per_token(model, form, materialise=False, autocast_dtype=None):  # the previous behaviour
        return rollouts.eager_form(model, form, materialise)

    monkeypatch.setattr(distill, "eager_form", per_token)
    torch.manual_seed(3)
    recast = trainer.rollout(student, batch)
    assert casts == [(torch.bfloat16, True)]
    assert torch.equal(once["input_ids"], recast["input_ids"])
    assert once["input_ids"].shape[1] > batch["prompt_ids"].shape[1]
    # The logits themselves are bit-identical, not merely close enough to sample the same tokens.
    ids, mask = once["input_ids"], once["attention_mask"]
    with torch.no_grad(), trainer.accelerator.autocast(), materialized_fake_quant(student):
        per_token_logits = student(input_ids=ids, attention_mask=mask).logits
        with original(student, torch.bfloat16, linear_only=True):
            once_logits = student(input_ids=ids, attention_mask=mask).logits
    assert per_token_logits.dtype == torch.bfloat16 and torch.equal(once_logits, per_token_logits)
    assert all(p is params[name] for name, p in student.named_parameters())
    assert {p.dtype for p in student.parameters()} == {torch.float32}


def test_linear_only_cast_keeps_tied_embeddings_and_norms():
    """Only linear weights are cast; an embedding tied to the head keeps its dtype and its object."""
    from test_quantization import tiny_llama

    from onpolicy_lib.rollouts import cast_for_rollout

    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    embedding = model.get_input_embeddings().weight
    with cast_for_rollout(model, torch.bfloat16, linear_only=True):
        assert model.get_input_embeddings().weight is embedding and embedding.dtype == torch.float32
        assert model.lm_head.weight.dtype == torch.bfloat16
        assert all(m.weight.dtype == torch.float32 for n, m in model.named_modules() if n.endswith("norm"))
    assert model.lm_head.weight is embedding


def decode_logits(model: torch.nn.Module, batch: dict, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Logits of the prompt's prefill (last position) and of cached decode steps feeding ``tokens``."""
    mask = batch["prompt_attention_mask"]
    out = model(input_ids=batch["prompt_ids"], attention_mask=mask, use_cache=True)
    logits, cache = [out.logits[:, -1]], out.past_key_values
    for column in tokens.T:
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=column[:, None], attention_mask=mask, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        cache = out.past_key_values
    return logits


needs_onednn = pytest.mark.skipif(not __import__("onpolicy_lib.rollouts").rollouts.packed_available(),
                                  reason="this torch build has no oneDNN packed linear")


def test_weight_major_linear_is_f_linear_within_float_rounding():
    """A decode step's input (one position per row) through weight @ x^T; anything else is F.linear itself."""
    from onpolicy_lib.rollouts import weight_major_linear

    torch.manual_seed(0)
    weight, bias = torch.randn(48, 32), torch.randn(48)
    for b in (None, bias):
        x = torch.randn(3, 1, 32)
        out = weight_major_linear(x, weight, b)
        assert out.shape == (3, 1, 48) and out.is_contiguous()
        torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, b), rtol=1e-5, atol=1e-5)
        for shape in ((3, 5, 32), (4, 32)):  # a prefill, a 2-D input: untouched
            x = torch.randn(*shape)
            assert torch.equal(weight_major_linear(x, weight, b), torch.nn.functional.linear(x, weight, b))


def test_weight_major_rollouts_sample_the_quantized_student_within_float_rounding(tmp_path, tokenizer, tiny_model,
                                                                                   monkeypatch):
    """rollout_matmul='weight_major' changes only the kernel of the student's decode-step products: over
    several cached decode steps its next-token distributions are the fake-quant forward's within float
    rounding (the prefill's are identical), the rollout samples with it, and training state is untouched."""
    from onpolicy_lib.quantization import materialized_fake_quant
    from onpolicy_lib.rollouts import weight_major_rollout

    trainer = make_trainer(tmp_path, tokenizer, tiny_model, lmbda=1.0, beta=1.0, rollout_matmul="weight_major")
    student = trainer.model.eval()
    batch = first_batch(trainer)
    params = {name: (p, p.detach().clone()) for name, p in student.named_parameters()}
    tokens = torch.randint(4, tiny_model.config.vocab_size, (batch["prompt_ids"].shape[0], 6),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = decode_logits(student, batch, tokens)  # the plain fake-quant forward
        with materialized_fake_quant(student), weight_major_rollout(student):
            patched = [m for m in student.modules() if "forward" in m.__dict__]
            assert len(patched) == sum(isinstance(m, torch.nn.Linear) for m in student.modules())
            fast = decode_logits(student, batch, tokens)
    assert torch.equal(fast[0], exact[0])  # the prefill goes through F.linear
    steps_exact, steps_fast = torch.cat(exact[1:]), torch.cat(fast[1:])
    assert float((steps_fast - steps_exact).abs().max()) < 1e-4
    assert float(kl(steps_exact, steps_fast).max()) < 1e-9
    # Every parameter is the same object with the same values afterwards, every forward the class's.
    assert not any("forward" in m.__dict__ for m in student.modules())
    for name, p in student.named_parameters():
        assert p is params[name][0] and torch.equal(p, params[name][1]), name
    # And a whole on-policy step samples through it, decode steps by weight @ x^T, and restores the layers.
    from onpolicy_lib import rollouts

    rows = []
    product = rollouts.weight_major_linear
    monkeypatch.setattr(rollouts, "weight_major_linear", lambda x, *a: rows.append(x.shape[:2]) or product(x, *a))
    seen = captured_step(trainer, batch)
    assert trainer.stats["batches_on_policy"] == 1 and seen["input_ids"].shape[1] > batch["prompt_ids"].shape[1]
    assert (2, 1) in rows and not any("forward" in m.__dict__ for m in student.modules())


@pytest.mark.parametrize("matmul", ["weight_major", pytest.param("packed", marks=needs_onednn)])
def test_decode_products_reach_lora_students(tiny_model, matmul):
    """Under a peft LoRA wrapper the base layers and the adapters all take the weight-major (or packed)
    product, within float rounding of the plain forward, and get their own forward back on exit."""
    from onpolicy_lib.quantization import materialized_fake_quant
    from onpolicy_lib.rollouts import packed_rollout, weight_major_rollout
    from onpolicy_lib.student import build_student

    student = build_student(tiny_model, "int4", GROUP, lora_r=4).eval()
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:  # non-zero adapters, so they count in the output
                p.normal_(0, 0.1)
    ids = torch.randint(4, tiny_model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    batch = {"prompt_ids": ids, "prompt_attention_mask": torch.ones_like(ids)}
    tokens = torch.randint(4, tiny_model.config.vocab_size, (2, 4), generator=torch.Generator().manual_seed(2))
    linears = sum(isinstance(m, torch.nn.Linear) for m in student.modules())
    with torch.no_grad():
        exact = torch.cat(decode_logits(student, batch, tokens)[1:])
        rollout = weight_major_rollout if matmul == "weight_major" else packed_rollout
        with materialized_fake_quant(student), rollout(student):
            assert sum("forward" in m.__dict__ for m in student.modules()) == linears
            fast = torch.cat(decode_logits(student, batch, tokens)[1:])
    assert any("lora_A" in name for name, _ in student.named_modules())
    assert float((fast - exact).abs().max()) < 1e-4 and float(kl(exact, fast).max()) < 1e-9
    assert not any("forward" in m.__dict__ for m in student.modules())


@needs_onednn
def test_packed_rollouts_sample_the_quantized_student_within_float_rounding(tmp_path, tokenizer, tiny_model,
                                                                             monkeypatch):
    """rollout_matmul='packed' changes only the kernel of the student's decode-step products (each weight
    reordered once for oneDNN): its next-token distributions are the fake-quant forward's within float
    rounding (the prefill's identical), greedy decoding gives generate's tokens, an on-policy step samples
    through it, and parameters and forwards are untouched afterwards."""
    from onpolicy_lib import rollouts
    from onpolicy_lib.quantization import materialized_fake_quant

    trainer = make_trainer(tmp_path, tokenizer, tiny_model, lmbda=1.0, beta=1.0, rollout_matmul="packed")
    student = trainer.model.eval()
    batch = first_batch(trainer)
    params = {name: (p, p.detach().clone()) for name, p in student.named_parameters()}
    tokens = torch.randint(4, tiny_model.config.vocab_size, (batch["prompt_ids"].shape[0], 6),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = decode_logits(student, batch, tokens)
        greedy = dict(input_ids=batch["prompt_ids"], attention_mask=batch["prompt_attention_mask"], do_sample=False,
                      max_new_tokens=12, min_new_tokens=12, pad_token_id=tokenizer.pad_token_id)
        with materialized_fake_quant(student):
            reference = student.generate(**greedy)
        # Without materialising first: the packed weights are the fake-quantized ones all the same.
        with rollouts.packed_rollout(student):
            patched = [m for m in student.modules() if "forward" in m.__dict__]
            assert len(patched) == sum(isinstance(m, torch.nn.Linear) for m in student.modules())
            fast = decode_logits(student, batch, tokens)
            assert torch.equal(student.generate(**greedy), reference)
    assert torch.equal(fast[0], exact[0])  # the prefill goes through F.linear
    steps_exact, steps_fast = torch.cat(exact[1:]), torch.cat(fast[1:])
    assert float((steps_fast - steps_exact).abs().max()) < 1e-4
    assert float(kl(steps_exact, steps_fast).max()) < 1e-9
    assert not any("forward" in m.__dict__ for m in student.modules())
    for name, p in student.named_parameters():
        assert p is params[name][0] and torch.equal(p, params[name][1]), name
    packed = []
    original = rollouts.packed_forward
    monkeypatch.setattr(rollouts, "packed_forward", lambda mod, w: packed.append(mod) or original(mod, w))
    seen = captured_step(trainer, batch)
    assert trainer.stats["batches_on_policy"] == 1 and seen["input_ids"].shape[1] > batch["prompt_ids"].shape[1]
    assert len(packed) == len(patched) and not any("forward" in m.__dict__ for m in student.modules())


def test_cakld_loss_is_its_definition_and_gamma_the_teachers_mean_confidence(tmp_path, tokenizer, tiny_model):
    """divergence='cakld': the loss is gamma * reverse + (1 - gamma) * forward KL on the scored tokens, and
    gamma is the teacher's mean probability of the training completions' tokens, computed directly here."""
    from onpolicy_lib.distill import teacher_confidence

    with pytest.raises(ValueError, match="divergence 'cakld' needs cakld_gamma"):
        make_trainer(tmp_path, tokenizer, tiny_model, divergence="cakld")
    data = tokenized(tokenizer)
    confidence = teacher_confidence(tiny_model, data, tokenizer.pad_token_id, chats=5, batch_size=2)
    probs = []
    with torch.no_grad():
        for row in (data[i] for i in range(5)):  # one chat at a time, no padding
            ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
            logp = tiny_model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
            targets = ids[0, 1:]
            start = len(row["prompt_ids"]) - 1
            probs += logp[start:].gather(-1, targets[start:, None]).exp().squeeze(-1).tolist()
    assert confidence["chats"] == 5 and confidence["tokens"] == len(probs)
    assert confidence["gamma"] == pytest.approx(sum(probs) / len(probs), rel=1e-5)

    gamma = confidence["gamma"]
    trainer = make_trainer(tmp_path, tokenizer, tiny_model, lmbda=0.0, divergence="cakld", cakld_gamma=gamma)
    batch = first_batch(trainer)
    with torch.no_grad():
        loss = trainer.distillation_loss(trainer.model, batch)
    expected = gamma * reference_loss(trainer.model, tiny_model, batch, beta=1.0) + \
        (1 - gamma) * reference_loss(trainer.model, tiny_model, batch, beta=0.0)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-6)
