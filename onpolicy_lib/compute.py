"""The arithmetic a run spends, counted from the model's shapes and the tokens it processed.

A FLOP-matched comparison needs a measure of cost that does not depend on the machine (CPU types
change between the runs of one study, and wall time with them), so cost is counted, not timed:
matrix-product FLOPs of every forward a step runs, at 2 FLOPs per multiply-add, over real (not
padded) tokens, the usual convention of scaling-law accounting (Kaplan et al. 2020):

* a forward over a row of ``T`` positions: the decoder's linear layers at every position, causal
  attention (``QK^T`` and ``AV``) over each position's context, and the output head at the
  positions whose logits are asked for;
* a backward costs twice its forward (the gradients with respect to inputs and to weights);
* a training step: the student's forward and backward plus the teacher's forward on the same rows,
  logits on the completion block only (``batches.completion_forward``);
* a rollout: the prompt's prefill (head at its last position) plus one single-position forward per
  generated token, attending over everything before it.

Norms, activations, RoPE and the softmax are left out (a few percent at these widths); so is the
padding a batch computes, which depends on how rows are grouped, not on the method.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onpolicy_lib.rundir import Run

BACKWARD_FACTOR = 2.0  # backward FLOPs per forward FLOP


@dataclass(frozen=True)
class Shape:
    """What a decoder's FLOPs depend on."""

    layers: int
    hidden: int
    linear_params: int  # weights of the decoder layers' matrix products (all layers)
    attention_width: int  # query heads x head dimension
    vocab: int

    @classmethod
    def of(cls, config: Any) -> Shape:
        """From a transformers ``PretrainedConfig`` of a Llama-like decoder (Llama, Qwen, Gemma)."""
        config = getattr(config, "text_config", None) or config
        hidden, layers = int(config.hidden_size), int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, o and k, v projections
        mlp = 3 * hidden * int(config.intermediate_size)  # gated: gate, up, down
        return cls(layers=layers, hidden=hidden, linear_params=layers * (attention + mlp),
                   attention_width=heads * head_dim, vocab=int(config.vocab_size))

    def forward(self, positions: int, context_before: int = 0, logits: int = 0) -> float:
        """FLOPs of one row's forward over ``positions`` new positions that follow ``context_before``
        cached ones, with the head at ``logits`` positions."""
        if positions <= 0:
            return 0.0
        linear = 2.0 * self.linear_params * positions
        # Position i (0-based among the new ones) attends over context_before + i + 1 keys.
        keys = positions * context_before + positions * (positions + 1) / 2
        attention = 2.0 * 2.0 * self.layers * self.attention_width * keys
        head = 2.0 * self.hidden * self.vocab * logits
        return linear + attention + head


def training_flops(shape: Shape, prompt_lengths: Iterable[int], completion_lengths: Iterable[int]) -> float:
    """A training micro-batch: the student's forward and backward and the teacher's forward over each
    row's prompt + completion, logits on the completion block (its positions and the prompt's last)."""
    total = 0.0
    for prompt, completion in zip(prompt_lengths, completion_lengths, strict=True):
        one = shape.forward(prompt + completion, logits=completion + 1 if completion else 0)
        total += one * (1.0 + BACKWARD_FACTOR) + one  # student forward + backward, teacher forward
    return total


def generation_flops(shape: Shape, prompt_lengths: Iterable[int], generated_lengths: Iterable[int]) -> float:
    """Sampling ``generated`` tokens after each row's prompt with a KV cache: the prefill (logits at
    its last position) and one forward per further token (the last sampled token needs none)."""
    total = 0.0
    for prompt, generated in zip(prompt_lengths, generated_lengths, strict=True):
        total += shape.forward(prompt, logits=1)
        for i in range(max(generated - 1, 0)):
            total += shape.forward(1, context_before=prompt + i, logits=1)
    return total


def matched_steps(target_flops: float, flops_per_step: float) -> int:
    """Optimizer steps at ``flops_per_step`` that spend ``target_flops`` (rounded to the nearest step)."""
    if flops_per_step <= 0:
        raise ValueError(f"flops_per_step must be positive, got {flops_per_step}")
    return max(1, round(target_flops / flops_per_step))


def run_flops(run_dir: str | Path) -> tuple[float, int]:
    """A finished run's recorded FLOPs and optimizer steps (its metrics)."""
    run = Run(Path(run_dir))
    metrics = run.metrics
    if metrics is None:
        raise ValueError(f"{run.path} is not a finished run (no metrics): it cannot set a match")
    if not metrics.get("flops"):
        raise ValueError(f"{run.path} records no FLOPs (the run predates FLOP accounting): it cannot set a match")
    return float(metrics["flops"]), len(metrics["steps"])


def flop_matched_steps(targets: Iterable[str | Path], references: Iterable[str | Path]) -> int:
    """Steps a reference-arm run needs to spend the targets' mean FLOPs, at the references' mean FLOPs per
    step: for example, the λ=0 steps that spend what the λ=1 runs spent, generation included."""
    spent = [run_flops(run)[0] for run in targets]
    per_step = [flops / steps for flops, steps in map(run_flops, references)]
    if not spent or not per_step:
        raise ValueError("flop_matched_steps needs at least one target run and one reference run")
    return matched_steps(sum(spent) / len(spent), sum(per_step) / len(per_step))
