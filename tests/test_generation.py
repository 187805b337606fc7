"""Batched generation for evaluation: length-sorted batches, a preallocated cache, finished rows dropped;
the same tokens as ``model.generate`` at fp32, in the input order."""

from __future__ import annotations

import pytest
import torch
from conftest import make_gemma_model, make_model

from onpolicy_lib import generation
from onpolicy_lib.generation import GenerationStats, encode_prompts, generate_ids, generate_texts, row_seed

EOS = [3, 10, 11]  # several end ids: rows end early, at different steps
# The tiny Gemma's greedy rows repeat one token each: these end some at once, others never.
ARCHS = {"llama": (make_model, EOS), "gemma": (make_gemma_model, [3, 26, 42])}


def prompts(vocab: int, lengths=(5, 11, 3, 8, 11, 6, 2), seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(20, vocab, (n,), generator=g).tolist() for n in lengths]


def reference(model, prompt_list, max_new_tokens, eos=EOS, **settings) -> list[list[int]]:
    """``generate`` on the left-padded batch of all prompts, each row cut after its first end id."""
    width = max(map(len, prompt_list))
    ids = torch.zeros((len(prompt_list), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompt_list):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, eos_token_id=eos, use_cache=True,
                         max_new_tokens=max_new_tokens, **settings)
    rows = []
    for seq in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(seq) if t in eos), len(seq))
        rows.append(seq[:cut])
    return rows


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_is_generate_token_for_token(tokenizer, arch):
    """Left-padded prompts of seven lengths, rows ending at different steps (dropped from the batch as
    they end), any batch size, Gemma's sliding-window layers (window 8): each row's tokens are generate's
    on the whole batch, in the input order."""
    make, eos = ARCHS[arch]
    model = make(len(tokenizer))
    batch = prompts(len(tokenizer))
    expected = reference(model, batch, 24, eos, do_sample=False)
    assert len({len(r) for r in expected}) > 1 and any(len(r) == 24 for r in expected)  # rows end apart
    for batch_size in (7, 3, 1):
        stats = GenerationStats()
        got = generate_ids(model, batch, max_new_tokens=24, eos_token_ids=eos, pad_token_id=0, batch_size=batch_size,
                           stats=stats)
        assert [tokens for tokens, _ in got] == expected
        assert [hit for _, hit in got] == [r[-1] not in eos for r in expected]
        assert stats.generated_tokens == sum(map(len, expected))
    # With all seven in one batch, rows left it as they ended: later steps decode fewer rows.
    stats = GenerationStats()
    generate_ids(model, batch, max_new_tokens=24, eos_token_ids=eos, pad_token_id=0, batch_size=7, stats=stats)
    rows = [r for r, _ in stats.steps]
    assert rows[-1] < 7 and rows == sorted(rows, reverse=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_is_generate_per_prompt_whatever_the_batch(tokenizer, arch):
    """Each prompt samples from its own generator: the same tokens at every batch size, and those of
    ``generate`` on that prompt alone seeded with :func:`row_seed`."""
    make, _ = ARCHS[arch]
    model = make(len(tokenizer))
    batch = prompts(len(tokenizer), seed=2)
    runs = [generate_ids(model, batch, max_new_tokens=20, eos_token_ids=EOS, pad_token_id=0, temperature=1.5,
                         seed=4, batch_size=batch_size) for batch_size in (7, 2, 1)]
    assert runs[0] == runs[1] == runs[2]
    for i, prompt in enumerate(batch):
        torch.manual_seed(row_seed(4, i))
        expected = reference(model, [prompt], 20, do_sample=True, temperature=1.5, top_k=0, top_p=1.0)[0]
        assert runs[0][i][0] == expected
    other = generate_ids(model, batch, max_new_tokens=20, eos_token_ids=EOS, pad_token_id=0, temperature=1.5, seed=5)
    assert other != runs[0]  # another seed, other samples
    assert any(len(tokens) < 20 for tokens, _ in runs[0])


def test_input_order_and_texts(tokenizer):
    """Chats go through the chat template with the generation prompt; outputs follow the input order,
    whatever the length sorting; the text skips the end token."""
    model = make_model(len(tokenizer))
    chats = [[{"role": "user", "content": text}] for text in ("hi", "what is 2 + 2?", "a", "count to ten, please")]
    ids = encode_prompts(tokenizer, chats)
    assert ids[0] == tokenizer.apply_chat_template(chats[0], add_generation_prompt=True, tokenize=True,
                                                   return_dict=False)
    out = generate_texts(model, tokenizer, chats, max_new_tokens=12, batch_size=2)
    backwards = generate_texts(model, tokenizer, chats[::-1], max_new_tokens=12, batch_size=3)
    assert [g.token_ids for g in backwards] == [g.token_ids for g in out][::-1]
    for g, prompt in zip(out, ids, strict=True):
        assert g.prompt_tokens == len(prompt)
        assert g.text == tokenizer.decode(g.token_ids, skip_special_tokens=True)
        assert g.hit_cap == (len(g.token_ids) == 12 and g.token_ids[-1] != tokenizer.eos_token_id)
    strings = generate_texts(model, tokenizer, ["ab", "cde"], max_new_tokens=4)
    assert [g.prompt_tokens for g in strings] == [2, 3]


def test_compaction_never_changes_tokens(tokenizer, monkeypatch):
    """Compacting at every end, or never, gives the same tokens (the dropped rows' cache rows go, the
    others stay where they were)."""
    model = make_model(len(tokenizer))
    batch = prompts(len(tokenizer), seed=3)
    outs = []
    for fraction in (0.0, 1 / 8, 2.0):
        monkeypatch.setattr(generation, "COMPACT_FRACTION", fraction)
        outs.append(generate_ids(model, batch, max_new_tokens=16, eos_token_ids=EOS, pad_token_id=0,
                                 temperature=1.5, seed=1))
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.skipif(not __import__("onpolicy_lib.rollouts").rollouts.packed_available(),
                    reason="this torch build has no oneDNN packed linear")
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_products_give_generates_tokens(tokenizer, arch):
    """matmul='packed' (weights reordered for oneDNN, rows leaving the batch as they end) gives generate's
    greedy tokens and the same samples as the linear products; every layer's forward is back afterwards;
    a quantized (deployed) layer keeps its own kernel."""
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    from onpolicy_lib.rollouts import packed_rollout

    make, eos = ARCHS[arch]
    model = make(len(tokenizer))
    batch = prompts(len(tokenizer))
    expected = reference(model, batch, 24, eos, do_sample=False)
    got = generate_ids(model, batch, max_new_tokens=24, eos_token_ids=eos, pad_token_id=0, batch_size=3,
                       matmul="packed")
    assert [tokens for tokens, _ in got] == expected
    sampled = [generate_ids(model, batch, max_new_tokens=20, eos_token_ids=EOS, pad_token_id=0, temperature=1.5,
                            seed=4, batch_size=7, matmul=matmul) for matmul in ("linear", "packed")]
    assert sampled[0] == sampled[1]
    assert not any("forward" in m.__dict__ for m in model.modules())
    quantize_(model.model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    with packed_rollout(model):
        patched = [name for name, m in model.named_modules() if "forward" in m.__dict__]
    assert patched == ["lm_head"]  # the full-precision head alone


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_new_tokens": 4, "matmul": "fast"}, "^matmul must be one of linear, packed; got 'fast'$"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 4, "temperature": -1.0}, "temperature"),
    ({"max_new_tokens": 4, "batch_size": 0}, "batch_size"),
])
def test_bad_settings_fail_early(tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_texts(make_model(len(tokenizer)), tokenizer, ["ab"], **kwargs)


def test_bad_prompt_named(tokenizer):
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        encode_prompts(tokenizer, ["ab", {"role": "user"}])


def test_prefill_groups():
    """Rows longest first, a group padded to its longest prompt by at most the slack."""
    assert generation.prefill_groups([5, 11, 3, 8, 11, 6, 2], slack=0.25) == [[1, 4, 3, 5], [0, 2], [6]]
    assert generation.prefill_groups([10, 9, 9, 10], slack=0.25) == [[0, 3, 1, 2]]
    assert generation.prefill_groups([100, 10], slack=100) == [[0, 1]]


def test_grouped_prefill_gives_the_same_tokens(tokenizer, monkeypatch):
    """Prompts prefilled in groups of similar length, or in one padded forward: the same tokens."""
    model = make_model(len(tokenizer))
    batch = prompts(len(tokenizer), lengths=(30, 4, 17, 3, 29, 9), seed=5)
    outs = []
    for slack in (0.0, 0.25, 100.0):
        monkeypatch.setattr(generation, "PREFILL_PADDING", slack)
        stats = GenerationStats()
        outs.append(generate_ids(model, batch, max_new_tokens=12, eos_token_ids=EOS, pad_token_id=0, stats=stats))
        assert stats.prefill_tokens == sum(map(len, batch))
        assert (stats.prefill_padded == 6 * 30) == (slack == 100.0)
    assert outs[0] == outs[1] == outs[2]
