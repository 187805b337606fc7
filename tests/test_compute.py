"""FLOP accounting (onpolicy_lib.compute) against torch's own FLOP counter, and as a run records it."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from torch.utils.flop_counter import FlopCounterMode

from onpolicy_lib.compute import Shape, generation_flops, matched_steps, training_flops


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_forward_matches_torch_flop_counter():
    model = make_model(vocab_size=60, layers=2).eval()
    model.config._attn_implementation = "eager"  # attention as plain matrix products torch counts
    shape = Shape.of(model.config)
    ids = torch.randint(4, 60, (1, 17))
    with torch.no_grad():
        counted = _counted(lambda: model(input_ids=ids))
    # Eager attention computes the full T x T product; ours counts the causal half it needs.
    full_attention = 2 * 2 * shape.layers * shape.attention_width * 17 * 17
    causal_attention = 2 * 2 * shape.layers * shape.attention_width * 17 * 18 / 2
    ours = shape.forward(17, logits=17)
    assert ours - causal_attention + full_attention == pytest.approx(counted, rel=1e-9)


def test_cached_decode_step_matches_torch_flop_counter():
    model = make_model(vocab_size=60, layers=2).eval()
    model.config._attn_implementation = "eager"
    shape = Shape.of(model.config)
    ids = torch.randint(4, 60, (1, 9))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
        counted = _counted(lambda: model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True))
    # One new position over 9 cached ones: it attends over 10 keys, eager computes exactly those.
    assert shape.forward(1, context_before=9, logits=1) == pytest.approx(counted, rel=1e-9)


def test_step_and_generation_totals():
    shape = Shape(layers=2, hidden=8, linear_params=1000, attention_width=8, vocab=50)
    one = shape.forward(5 + 3, logits=4)
    assert training_flops(shape, [5], [3]) == pytest.approx(4 * one)  # student fwd + 2x bwd, teacher fwd
    gen = generation_flops(shape, [5], [3])
    assert gen == pytest.approx(shape.forward(5, logits=1) + shape.forward(1, 5, 1) + shape.forward(1, 6, 1))
    assert training_flops(shape, [5, 2], [3, 0]) == pytest.approx(4 * one + 4 * shape.forward(2))
    assert matched_steps(1000.0, 300.0) == 3
    with pytest.raises(ValueError, match="flops_per_step"):
        matched_steps(1.0, 0.0)


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_a_training_step_records_its_flops(tmp_path, tokenizer, tiny_model, lmbda):
    from test_distill import captured_step, first_batch, make_trainer

    trainer = make_trainer(tmp_path, tokenizer, tiny_model, lmbda=lmbda)
    seen = captured_step(trainer, first_batch(trainer))
    width_p = seen["prompt_ids"].shape[1]
    prompts = seen["attention_mask"][:, :width_p].sum(1).tolist()
    completions = seen["attention_mask"][:, width_p:].sum(1).tolist()
    shape = Shape.of(tiny_model.config)
    expected = training_flops(shape, prompts, completions)
    if lmbda:  # the rollout that made the completions
        expected += generation_flops(shape, prompts, completions)
    assert trainer.stats["flops"] == pytest.approx(expected)


def test_flop_matched_steps_from_recorded_runs(tmp_path):
    """The reference arm's steps that spend the targets' mean FLOPs; a run without FLOPs is refused."""
    import json

    import pytest

    from onpolicy_lib.compute import flop_matched_steps

    def run(name: str, flops: float | None, steps: int) -> str:
        path = tmp_path / name
        path.mkdir()
        (path / "metrics.json").write_text(json.dumps({"flops": flops, "steps": [{"step": i} for i in range(steps)]}))
        return str(path)

    on_policy = [run("l1-a", 3.0e12, 100), run("l1-b", 3.4e12, 100)]
    off_policy = [run("l0-a", 2.0e12, 100), run("l0-b", 2.0e12, 100)]
    assert flop_matched_steps(on_policy, off_policy) == 160  # 3.2e12 / 2e10 per step
    with pytest.raises(ValueError, match="records no FLOPs"):
        flop_matched_steps([run("old", None, 100)], off_policy)
