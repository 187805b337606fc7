"""Compiled rollouts (``rollout_compile``): a static-cache copy of the student sampled with ``generate``'s
rules, its decode step compiled once for a whole run."""

from __future__ import annotations

import pytest
import torch
from conftest import make_gemma_model, make_model
from test_distill import captured_step, first_batch, make_trainer

from onpolicy_lib.compiled_rollouts import CompiledSampler
from onpolicy_lib.quantization import active_fake_quantized, prepare_qat


def left_padded_prompts(vocab: int, rows: int = 3, width: int = 11, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(4, vocab, (rows, width), generator=g)
    mask = torch.ones_like(prompts)
    for row in range(rows):
        mask[row, : 2 * row] = 0
    return prompts.masked_fill(mask == 0, 0), mask


def sample_both(model, sampler, prompts, mask, eos, **settings):
    torch.manual_seed(5)
    reference = model.generate(input_ids=prompts, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                               pad_token_id=0, eos_token_id=eos, use_cache=True, **settings)
    torch.manual_seed(5)
    ours = sampler.sample(prompts, mask, eos_token_ids=eos, pad_token_id=0, **settings)
    return reference, ours


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_static_cache_sampling_is_generate_token_for_token(tokenizer, arch):
    """Left-padded prompts, min_new_tokens, rows ending early, Gemma's sliding-window layers (window 8,
    sequences of 31): the same tokens as ``model.generate`` from the same random stream."""
    model = make_model(len(tokenizer)) if arch == "llama" else make_gemma_model(len(tokenizer))
    eos = [model.config.eos_token_id, *range(10, 20)]  # several end ids (as Qwen3 has two): rows end early
    sampler = CompiledSampler(model, backend=None)
    sampler.refresh(model)
    ended = 0
    for seed, settings in enumerate(({"temperature": 0.9, "max_new_tokens": 20, "min_new_tokens": 3},
                                     {"temperature": 3.0, "max_new_tokens": 24, "min_new_tokens": 0})):
        reference, ours = sample_both(model, sampler, *left_padded_prompts(len(tokenizer), seed=seed), eos,
                                      **settings)
        assert torch.equal(ours, reference)
        ended += int(torch.isin(ours[:, 11:], torch.tensor(eos)).any())
    assert ended  # some row stopped early


def test_compiled_step_samples_the_same_and_compiles_once_per_run(tokenizer):
    """Compiled, the same tokens as the eager loop; new weights (refreshed in place) and new prompt widths
    reuse the one graph of the decode step."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    teacher = make_model(len(tokenizer))
    counter = CompileCounter()
    compiled = CompiledSampler(teacher, max_cache_len=64, backend=counter)
    eager = CompiledSampler(teacher, max_cache_len=64, backend=None)
    eos = [teacher.config.eos_token_id]
    for width, scale in ((11, 1.0), (7, 0.9), (13, 1.1)):
        with torch.no_grad():
            for p in teacher.parameters():
                p.mul_(scale)  # a training step's new weights
        compiled.refresh(teacher)
        eager.refresh(teacher)
        prompts, mask = left_padded_prompts(len(tokenizer), width=width)
        runs = []
        for sampler in (compiled, eager):
            torch.manual_seed(7)
            runs.append(sampler.sample(prompts, mask, eos_token_ids=eos, pad_token_id=0, temperature=1.0,
                                       max_new_tokens=10))
        assert torch.equal(runs[0], runs[1])
    assert counter.frame_count == 1


def test_refresh_copies_the_students_quantized_weights_and_untied_head(tokenizer):
    """The copy holds each fake-quantized weight as its quantizer gives it and every other parameter as it
    is; a quantized head tied to the embedding gets its own matrix there (the embedding stays full
    precision, as in the student)."""
    teacher = make_model(len(tokenizer))
    student = prepare_qat(make_model(len(tokenizer)), "int4", 32, quantize_head=True)
    sampler = CompiledSampler(teacher, backend=None)
    sampler.refresh(student)
    shadow = dict(sampler.shadow.named_modules())
    names = {id(m): n for n, m in student.named_modules()}
    quantized = list(active_fake_quantized(student))
    assert any(names[id(m)] == "lm_head" for m, _ in quantized)
    with torch.no_grad():
        for mod, quantizer in quantized:
            assert torch.equal(shadow[names[id(mod)]].weight, quantizer(mod.weight))
    assert torch.equal(sampler.shadow.model.embed_tokens.weight, student.model.embed_tokens.weight)
    assert not torch.equal(sampler.shadow.lm_head.weight, sampler.shadow.model.embed_tokens.weight)
    # And the copy's forward is the fake-quant student's.
    prompts, mask = left_padded_prompts(len(tokenizer))
    with torch.no_grad():
        torch.testing.assert_close(sampler.shadow(input_ids=prompts, attention_mask=mask).logits,
                                   student(input_ids=prompts, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)


def test_an_on_policy_step_samples_through_the_compiled_rollout(tmp_path, tokenizer, tiny_model):
    """rollout_compile=True: the on-policy step's samples come from the sampler, fed the step's shared
    quantized weights; the student's own parameters are untouched by the rollout."""
    trainer = make_trainer(tmp_path, tokenizer, tiny_model, lmbda=1.0, beta=1.0, rollout_compile=True,
                           rollout_cache_len=64, rollout_matmul="weight_major")
    batch = first_batch(trainer)
    calls = []
    original = CompiledSampler.sample
    CompiledSampler.sample = lambda self, *a, **k: calls.append(a[0].shape) or original(self, *a, **k)
    try:
        seen = captured_step(trainer, batch)
    finally:
        CompiledSampler.sample = original
    assert calls == [batch["prompt_ids"].shape] and trainer.stats["batches_on_policy"] == 1
    assert seen["input_ids"].shape[1] > batch["prompt_ids"].shape[1]
    assert trainer._sampler.max_cache_len == 64
    assert all(type(m) is torch.nn.Linear for m in trainer._sampler.shadow.modules()
               if isinstance(m, torch.nn.Linear))


def test_static_caches_are_sized_to_the_batch_in_a_few_lengths(tokenizer):
    """Without a fixed length, each batch gets a cache of its prompt width plus new tokens, rounded up to
    64, 128, 192, 256, 384, ...: short batches do not attend over the longest possible cache, and a run's
    batches share a handful of lengths (graphs)."""
    from onpolicy_lib.compiled_rollouts import cache_bucket

    assert [cache_bucket(n) for n in (1, 64, 65, 129, 193, 257, 385, 1000)] == [64, 64, 128, 192, 256, 384, 512, 1024]
    assert all(n <= cache_bucket(n) <= max(64, 2 * n) for n in range(1, 2000))
    model = make_model(len(tokenizer))
    sampler = CompiledSampler(model, backend=None)
    sampler.refresh(model)
    for width in (11, 40, 70):
        prompts, mask = left_padded_prompts(len(tokenizer), width=width)
        sampler.sample(prompts, mask, eos_token_ids=[], pad_token_id=0, temperature=1.0, max_new_tokens=8)
    assert sorted(sampler._caches) == [(3, 64), (3, 128)]
