"""Generalized knowledge distillation (GKD, Agarwal et al. 2023) on HF ``Trainer``.

A config dataclass plus a trainer, the pairing TRL uses (``GKDConfig`` /
``GKDTrainer``), and with TRL's meanings:

* ``lmbda``: each micro-batch, with this probability the completions are the
  student's own samples (on-policy); otherwise they are the dataset's
  completions (or, with ``seq_kd``, the teacher's samples).
* ``beta``: the generalized Jensen-Shannon divergence; ``beta=0`` is exactly
  forward KL(teacher || student), ``beta=1`` exactly reverse KL(student || teacher).
* ``temperature``: the sampling temperature of rollouts (as in TRL, the
  divergence itself is computed at temperature 1).

We write the step ourselves rather than subclassing TRL's ``GKDTrainer`` for
two measured reasons: its rollouts run the fake-quantized student, which
re-quantizes every weight at every generated token (~5x slower here), and its
loss materialises several full-vocabulary copies of the whole padded sequence.
Ours quantizes each weight once per on-policy step and shares it between the
rollout and the training forward (:func:`fake_quantized_once`), scores only the
completion block, and computes the divergence in bounded chunks with an analytic
gradient (:func:`generalized_jsd`); each is tested equal to the straightforward
computation. ``python -m onpolicy_lib.bench`` measures the step against its
arithmetic floor and against stock TRL. Everything else (optimizer, schedule,
accumulation, checkpoints, resume, logging, progress bar) is the stock ``Trainer``.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

from onpolicy_lib.quantization import active_fake_quantized, materialized_fake_quant

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------- the divergence
# Elements of the [N, V] logits handled at once: the fp32 temporaries of a chunk (a few
# [rows, V] tensors) stay bounded whatever N is, instead of several copies of [N, V].
# Small on CPU, where cache-sized chunks measured fastest; large on accelerators, where
# each chunk costs a dozen kernel launches (64 MiB per fp32 temporary).
CHUNK_ELEMENTS = 1 << 20
CHUNK_ELEMENTS_ACCELERATOR = 1 << 24


def generalized_jsd_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                              beta: float) -> torch.Tensor:
    """The straightforward autograd formula of :func:`generalized_jsd` (several fp32 ``[N, V]`` copies).

    Kept as the definition the lean implementation is tested against.
    """
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)  # KL(teacher || student)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)  # KL(student || teacher)
    m = torch.logsumexp(torch.stack([s + math.log1p(-beta), t + math.log(beta)]), dim=0)
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


def _jsd_chunk(s: torch.Tensor, t: torch.Tensor, beta: float,
               grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row divergence of fp32 logit rows and, if ``grad``, its gradient w.r.t. the student logits."""
    s = F.log_softmax(s, dim=-1)
    t = F.log_softmax(t, dim=-1)
    if beta == 0:
        p_t = t.exp()
        value = (p_t * (t - s)).sum(-1)
        # d KL(t || s) / d z_s = softmax(z_s) - p_t
        return value, (s.exp().sub_(p_t) if grad else None)
    if beta == 1:
        p_s = s.exp()
        log_ratio = s - t
        value = (p_s * log_ratio).sum(-1)
        # d KL(s || t) / d z_s = p_s * (log p_s - log p_t - KL)
        return value, (log_ratio.sub_(value[:, None]).mul_(p_s) if grad else None)
    m = torch.logaddexp(s + math.log1p(-beta), t + math.log(beta))
    kl_t = (t.exp() * (t - m)).sum(-1)
    p_s = s.exp()
    s_minus_m = s - m
    kl_s = (p_s * s_minus_m).sum(-1)
    value = beta * kl_t + (1 - beta) * kl_s
    if not grad:
        return value, None
    # With m = beta p_t + (1 - beta) p_s, dL/dp_s = (1 - beta)(log p_s - log m) (the terms through m
    # cancel), so through the softmax: dL/dz_s = (1 - beta) p_s (log p_s - log m - KL(p_s || m)).
    return value, s_minus_m.sub_(kl_s[:, None]).mul_(p_s).mul_(1 - beta)


def _segments(rows: list[int], chunk: int) -> list[tuple[int, int, int]]:
    """``(first_row, stop_row, output_offset)`` slices covering ``rows`` in order, at most ``chunk`` long.

    Consecutive row ids become one slice: the scored rows of a batch are a few contiguous runs
    (one per completion), and slices are views, whereas gathering rows by index copies them
    (``index_select`` along rows is also very slow on CPU).
    """
    segments: list[tuple[int, int, int]] = []
    for offset, row in enumerate(rows):
        if segments:
            first, stop, out = segments[-1]
            if row == stop and stop - first < chunk:
                segments[-1] = (first, stop + 1, out)
                continue
        segments.append((row, row + 1, offset))
    return segments


class _ChunkedJSD(torch.autograd.Function):
    """Generalized JSD of selected rows of ``[R, V]`` logits, slice by slice, with an analytic backward.

    Nothing of size ``[N, V]`` is kept between forward and backward (the backward recomputes
    each slice), and the gradient is written straight into a tensor shaped like the student
    logits, so no masked copy of the logits and no scatter of its gradient is built.
    """

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor, beta: float,
                segments: list[tuple[int, int, int]], n: int) -> torch.Tensor:
        # Teacher logits produced under torch.inference_mode cannot go through save_for_backward;
        # they are constants here, so keeping a plain reference loses nothing but the version check.
        ctx.inference_teacher = teacher if teacher.is_inference() else None
        ctx.save_for_backward(student, *([] if teacher.is_inference() else [teacher]))
        ctx.beta, ctx.segments = beta, segments
        out = torch.empty(n, dtype=torch.float32, device=student.device)
        for first, stop, offset in segments:
            out[offset:offset + stop - first] = _jsd_chunk(student[first:stop].float(), teacher[first:stop].float(),
                                                           beta, grad=False)[0]
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        student, *saved = ctx.saved_tensors
        teacher = saved[0] if saved else ctx.inference_teacher
        grad = torch.zeros_like(student)
        for first, stop, offset in ctx.segments:
            _, g = _jsd_chunk(student[first:stop].float(), teacher[first:stop].float(), ctx.beta, grad=True)
            # add_, not copy_: a row listed twice must receive both contributions.
            grad[first:stop].add_(g.mul_(grad_out[offset:offset + stop - first, None]))
        return grad, None, None, None, None


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token generalized JSD between student and teacher logits, summed over the vocabulary.

    Same definition as TRL's ``GKDTrainer.generalized_jsd_loss``: with the
    mixture ``m = beta * p_teacher + (1 - beta) * p_student``,
    ``beta * KL(p_teacher || m) + (1 - beta) * KL(p_student || m)``, and the two
    endpoints replaced by the KL they stand for (forward at 0, reverse at 1).

    The logits are ``[..., V]``; ``rows`` optionally selects rows of their flattened ``[R, V]``
    view (default: all), and the result is one fp32 value per selected row, in that order.
    Computed a slice of rows at a time with an analytic gradient for the student: the same
    values and gradients as :func:`generalized_jsd_reference` (up to float rounding), without
    its full-vocabulary fp32 copies. The teacher logits are constants (no gradient).
    """
    if teacher_logits.requires_grad:
        raise ValueError("generalized_jsd treats the teacher logits as constants; pass them detached")
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.reshape(-1, vocab)
    ids = list(range(student.shape[0])) if rows is None else rows.tolist()
    budget = CHUNK_ELEMENTS if student.device.type == "cpu" else CHUNK_ELEMENTS_ACCELERATOR
    chunk = max(1, budget // vocab)
    return _ChunkedJSD.apply(student, teacher, float(beta), _segments(ids, chunk), len(ids))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    # Left-padded prompts: positions must count real tokens only, exactly as
    # ``generate`` does, so rollouts and the training forward see the same inputs.
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ---------------------------------------------------------------------------- one quantization per step
def _reusing(quantizer: torch.nn.Module, latent: torch.Tensor, shared: torch.Tensor) -> Callable[..., torch.Tensor]:
    compute = quantizer.forward
    version = latent._version

    def forward(weight: torch.Tensor) -> torch.Tensor:
        # Only the exact weight it was computed from, unmodified since, and only while enabled.
        if weight is latent and latent._version == version and quantizer.enabled:
            return shared
        return compute(weight)

    return forward


@contextlib.contextmanager
def fake_quantized_once(model: torch.nn.Module) -> Iterator[int]:
    """Fake-quantize every active weight of ``model`` once, for everything run inside the context.

    Each active ``FakeQuantizedLinear`` (also under a peft LoRA wrapper) gets its weight
    fake-quantized on entry, with the autograd graph back to the latent weight when
    gradients are enabled, and its quantizer returns that tensor instead of recomputing it.
    An on-policy step then quantizes each weight once, where it used to do so twice (once
    for the rollout's materialised weights, once more in the training forward): the
    rollout's forwards read the shared tensors (under ``no_grad``, no graph), the training
    forward uses them with their graph, and backward flows through it to the latent
    weights exactly as in the plain fake-quant forward. Same operations on the same values:
    samples, loss and gradients are bit-identical. A call with any other tensor, or after
    the latent weight changed in place, falls back to the real computation. Yields the
    number of weights shared.
    """
    patched: list[tuple[torch.nn.Module, Any]] = []
    try:
        for mod, quantizer in active_fake_quantized(model):
            latent = mod.weight
            shared = quantizer(latent)
            patched.append((quantizer, quantizer.__dict__.get("forward")))
            quantizer.forward = _reusing(quantizer, latent, shared)
        yield len(patched)
    finally:
        for quantizer, previous in reversed(patched):
            if previous is None:
                del quantizer.forward  # back to the class's method
            else:
                quantizer.forward = previous


# ---------------------------------------------------------------------------- batches
@dataclass
class DistillCollator:
    """Left-padded prompts followed by right-padded completions.

    ``input_ids = [pad.. prompt | completion ..pad]``: the prompt block is what
    ``generate`` consumes and returns, so off- and on-policy batches share one
    layout and one loss.
    """

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [list(f["prompt_ids"]) for f in features]
        completions = [list(f["completion_ids"]) for f in features]
        width_p = max(map(len, prompts))
        width_c = max(map(len, completions))
        batch = len(features)
        prompt_ids = torch.full((batch, width_p), self.pad_token_id, dtype=torch.long)
        prompt_mask = torch.zeros((batch, width_p), dtype=torch.long)
        completion_ids = torch.full((batch, width_c), self.pad_token_id, dtype=torch.long)
        completion_mask = torch.zeros((batch, width_c), dtype=torch.long)
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            if p:
                prompt_ids[i, width_p - len(p):] = torch.tensor(p)
                prompt_mask[i, width_p - len(p):] = 1
            completion_ids[i, : len(c)] = torch.tensor(c)
            completion_mask[i, : len(c)] = 1
        return join_prompt_completion(prompt_ids, prompt_mask, completion_ids, completion_mask)


def join_prompt_completion(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                           completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    labels = input_ids.clone()
    labels[:, : prompt_ids.shape[1]] = IGNORE_INDEX
    labels[attention_mask == 0] = IGNORE_INDEX
    return {"prompt_ids": prompt_ids, "prompt_attention_mask": prompt_mask, "input_ids": input_ids,
            "attention_mask": attention_mask, "labels": labels}


def completion_mask_from_generation(completion_ids: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """1 up to and including the first end-of-sequence token, 0 after it."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return (~after_eos).long()


def generate_completions(model: torch.nn.Module, inputs: dict[str, torch.Tensor], pad_token_id: int,
                         eos_token_ids: list[int], **generate_kwargs: Any) -> dict[str, torch.Tensor]:
    """Complete the batch's prompts with ``model.generate`` and rebuild the batch around the completions."""
    sequences = model.generate(input_ids=inputs["prompt_ids"], attention_mask=inputs["prompt_attention_mask"],
                               pad_token_id=pad_token_id, eos_token_id=eos_token_ids, use_cache=True,
                               **generate_kwargs)
    completion_ids = sequences[:, inputs["prompt_ids"].shape[1]:]
    completion_mask = completion_mask_from_generation(completion_ids, eos_token_ids)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad_token_id)
    return join_prompt_completion(inputs["prompt_ids"], inputs["prompt_attention_mask"], completion_ids,
                                  completion_mask)


def completion_forward(inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Model kwargs that return only the logits at positions ``P-1 .. T-1`` (``P`` = prompt width).

    Positions ``P-1 .. T-2`` predict the completion tokens; asking for these logits alone
    avoids a ``[B, T, V]`` tensor for the whole padded sequence.
    """
    keep = inputs["input_ids"].shape[1] - inputs["prompt_ids"].shape[1] + 1
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
            "position_ids": position_ids_from_mask(inputs["attention_mask"]), "logits_to_keep": keep,
            "use_cache": False}


# ---------------------------------------------------------------------------- config + trainer
@dataclass
class DistillConfig(TrainingArguments):
    lmbda: float = field(default=0.5, metadata={"help": "probability a batch uses student-generated completions"})
    beta: float = field(default=0.5, metadata={"help": "generalized JSD: 0 = forward KL, 1 = reverse KL"})
    temperature: float = field(default=0.9, metadata={"help": "sampling temperature of rollouts"})
    seq_kd: bool = field(default=False, metadata={"help": "off-policy batches use teacher samples"})
    max_new_tokens: int = field(default=128, metadata={"help": "rollout length"})
    min_new_tokens: int = field(default=0, metadata={"help": "minimum rollout length"})
    fast_rollouts: bool = field(
        default=True, metadata={"help": "sample from once-per-step materialised quantized weights (same numbers)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("lmbda", "beta"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


class DistillTrainer(Trainer):
    """Distils ``teacher_model`` into ``model`` (the quantization-aware student)."""

    args: DistillConfig

    def __init__(self, model: PreTrainedModel, teacher_model: PreTrainedModel, args: DistillConfig,
                 processing_class: PreTrainedTokenizerBase, **kwargs: Any) -> None:
        kwargs.setdefault("data_collator", DistillCollator(processing_class.pad_token_id))
        super().__init__(model=model, args=args, processing_class=processing_class, **kwargs)
        self.teacher_model = teacher_model.eval().requires_grad_(False)
        # Our loss is a per-micro-batch token mean; the Trainer then divides by the
        # accumulation steps (the number of completion tokens differs per rollout, so
        # the dataset-side ``num_items_in_batch`` would be wrong for on-policy batches).
        self.model_accepts_loss_kwargs = False
        eos = processing_class.eos_token_id
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        self.eos_token_ids = sorted({eos, *ids} - {None})
        self.stats = {"tokens_generated": 0, "tokens_trained": 0, "batches_on_policy": 0, "batches_seq_kd": 0,
                      "batches": 0, "rollout_seconds": 0.0}
        self._log_since = dict(self.stats)
        self._micro, self._micro_step = 0, None
        self._weights_shared = False

    # -- rollouts
    @torch.no_grad()
    def rollout(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sample completions for the batch's prompts from ``model`` and rebuild the batch around them."""
        start = time.perf_counter()
        unwrapped = self.accelerator.unwrap_model(model)
        was_training = unwrapped.training
        unwrapped.eval()  # sample from the policy as deployed: no dropout
        # Inside an on-policy step the weights are already quantized once (``fake_quantized_once``);
        # otherwise (a rollout on its own) they are materialised for the rollout's duration.
        fast = self.args.fast_rollouts and unwrapped is not self.teacher_model and not self._weights_shared
        try:
            with materialized_fake_quant(unwrapped) if fast else nullcontext():
                batch = generate_completions(
                    unwrapped, inputs, self.processing_class.pad_token_id, self.eos_token_ids,
                    do_sample=True, temperature=self.args.temperature, top_k=0, top_p=1.0,
                    max_new_tokens=self.args.max_new_tokens, min_new_tokens=self.args.min_new_tokens)
        finally:
            unwrapped.train(was_training)
        width_p = inputs["prompt_ids"].shape[1]
        self.stats["tokens_generated"] += int(batch["attention_mask"][:, width_p:].sum())
        self.stats["rollout_seconds"] += time.perf_counter() - start
        return batch

    def on_policy_draw(self) -> float:
        # A draw keyed by (seed, step, micro-batch) rather than a running generator, so the
        # on/off-policy sequence is reproducible, untouched by other users of Python's global
        # random state, and identical after resuming from a checkpoint.
        step = self.state.global_step
        self._micro = self._micro + 1 if self._micro_step == step else 0
        self._micro_step = step
        return random.Random(f"{self.args.seed}:{step}:{self._micro}").random()

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        inputs = self._prepare_inputs(inputs)
        self.stats["batches"] += 1
        on_policy = self.on_policy_draw() < self.args.lmbda
        # Checkpointed layers recompute their forward inside backward; keep those to the plain path.
        share = on_policy and self.args.fast_rollouts and not self.args.gradient_checkpointing
        with self.shared_weights(model) if share else nullcontext():
            if on_policy:
                inputs = self.rollout(model, inputs)
                self.stats["batches_on_policy"] += 1
            elif self.args.seq_kd:
                inputs = self.rollout(self.teacher_model, inputs)
                self.stats["batches_seq_kd"] += 1
            self.stats["tokens_trained"] += int((inputs["labels"] != IGNORE_INDEX).sum())
            return super().training_step(model, inputs, num_items_in_batch)

    @contextlib.contextmanager
    def shared_weights(self, model: torch.nn.Module) -> Iterator[None]:
        """One fake quantization of the student's weights for a whole on-policy step (rollout + training)."""
        with contextlib.ExitStack() as stack:
            # Computed under the loss's autocast context, as the training forward would compute them.
            with self.compute_loss_context_manager():
                stack.enter_context(fake_quantized_once(self.accelerator.unwrap_model(model)))
            self._weights_shared = True
            try:
                yield
            finally:
                self._weights_shared = False

    # -- the loss
    def distillation_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = inputs["labels"]
        width_p = inputs["prompt_ids"].shape[1]
        forward = completion_forward(inputs)  # only the completion block is scored
        with torch.no_grad():
            teacher_logits = self.teacher_model(**forward).logits
        student_logits = model(**forward).logits
        mask = labels[:, width_p:] != IGNORE_INDEX
        if not mask.any():
            return student_logits.sum() * 0.0  # keeps the graph; nothing to learn from this batch
        # Scored rows of the flattened [B * keep, V] logits (position k predicts token k + 1; the
        # last position predicts nothing): the divergence reads them in place, so neither the
        # [:, :-1] slice nor a masked copy of the logits (nor their backward scatters) is built.
        rows = F.pad(mask, (0, 1)).flatten().nonzero().squeeze(1)
        return generalized_jsd(student_logits, teacher_logits, self.args.beta, rows=rows).mean()

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        loss = self.distillation_loss(model, inputs)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor, None, None]:
        # Held-out evaluation: the same divergence on the dataset's completions (off-policy),
        # a low-noise signal of how close the student has come to the teacher.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            return self.distillation_loss(model, inputs).detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the counts since the previous one
            logs.update(self.unlogged_stats())
            self._log_since = dict(self.stats)
        super().log(logs, start_time)

    def unlogged_stats(self) -> dict[str, float]:
        # Deltas rather than running totals: summed over the log they give the run's
        # totals even when it was resumed from a checkpoint in a fresh process.
        since = {k: self.stats[k] - self._log_since[k] for k in self.stats}
        since["rollout_seconds"] = round(since["rollout_seconds"], 3)
        since["on_policy_fraction"] = since["batches_on_policy"] / max(since["batches"], 1)
        return since
