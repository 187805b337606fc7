"""The distillation divergences and their gradients: GKD's generalized Jensen-Shannon divergence,
and BitDistiller's confidence-aware KL (CAKLD; Du et al. 2024, arXiv 2402.10631).

A library module apart from the trainer, as torchtune keeps its ``kd_losses``: the fidelity
metrics use the same function at ``beta=0`` (forward KL) and ``beta=1`` (reverse KL).
:func:`generalized_jsd_reference` and :func:`cakld_reference` are the straightforward autograd
formulas; :func:`generalized_jsd` and :func:`cakld` compute the same values and gradients in
bounded chunks with an analytic backward, so no full-vocabulary fp32 copy of the whole batch is
ever built.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

# Elements of the [N, V] logits handled at once: the fp32 temporaries of a chunk (a few
# [rows, V] tensors) stay bounded whatever N is, instead of several copies of [N, V].
# Small on CPU, where cache-sized chunks measured fastest; large on accelerators, where
# each chunk costs a dozen kernel launches (64 MiB per fp32 temporary).
CHUNK_ELEMENTS = 1 << 20
CHUNK_ELEMENTS_ACCELERATOR = 1 << 24
# Where the gradient is computed in the forward pass and kept for backward (one [N, V] tensor, the
# size of the student logits, held in between), instead of recomputing every slice in backward: on
# CPU this saves most of the backward's cost (its exp/log passes over the vocabulary: the divergence's
# forward and backward together about 2x faster), and memory is plentiful; on accelerators compute is
# cheap and memory is not. Both give the same bits (the same slices, the same products).
FUSED_GRAD_DEVICES = ("cpu",)


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


def cakld_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, gamma: float) -> torch.Tensor:
    """``gamma * KL(student || teacher) + (1 - gamma) * KL(teacher || student)`` per row, by autograd."""
    return (gamma * generalized_jsd_reference(student_logits, teacher_logits, 1.0)
            + (1 - gamma) * generalized_jsd_reference(student_logits, teacher_logits, 0.0))


def _cakld_chunk(s: torch.Tensor, t: torch.Tensor, gamma: float,
                 grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row CAKLD of fp32 logit rows and, if ``grad``, its gradient w.r.t. the student logits."""
    s = F.log_softmax(s, dim=-1)
    t = F.log_softmax(t, dim=-1)
    p_s, p_t = s.exp(), t.exp()
    log_ratio = s - t
    reverse = (p_s * log_ratio).sum(-1)
    forward = (p_t * -log_ratio).sum(-1)
    value = gamma * reverse + (1 - gamma) * forward
    if not grad:
        return value, None
    # gamma * p_s (log p_s - log p_t - KL(s || t)) + (1 - gamma) (p_s - p_t): the two endpoints' gradients.
    reverse_grad = log_ratio.sub_(reverse[:, None]).mul_(p_s).mul_(gamma)
    return value, reverse_grad.add_(p_s.sub_(p_t).mul_(1 - gamma))


_CHUNKS = {"jsd": _jsd_chunk, "cakld": _cakld_chunk}


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


class _ChunkedDivergence(torch.autograd.Function):
    """A divergence (``"jsd"`` or ``"cakld"`` with its weight) of selected rows of ``[R, V]`` logits,
    slice by slice, with an analytic backward.

    Nothing of size ``[N, V]`` is kept between forward and backward (the backward recomputes
    each slice), and the gradient is written straight into a tensor shaped like the student
    logits, so no masked copy of the logits and no scatter of its gradient is built.
    """

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor, kind: str, weight: float,
                segments: list[tuple[int, int, int]], n: int) -> torch.Tensor:
        ctx.chunk, ctx.weight, ctx.segments, ctx.dtype = _CHUNKS[kind], weight, segments, student.dtype
        ctx.fused = ctx.needs_input_grad[0] and student.device.type in FUSED_GRAD_DEVICES
        out = torch.empty(n, dtype=torch.float32, device=student.device)
        # Kept in fp32 until weighted, so a bf16 gradient is rounded once, as the recomputed one is.
        grad = torch.zeros_like(student, dtype=torch.float32) if ctx.fused else None
        for first, stop, offset in segments:
            value, g = ctx.chunk(student[first:stop].float(), teacher[first:stop].float(), weight, grad=ctx.fused)
            out[offset:offset + stop - first] = value
            if g is not None:
                grad[first:stop] = g  # a row listed twice gets the same gradient: weighted in backward
        if ctx.fused:
            ctx.grad = grad
            return out
        # Teacher logits produced under torch.inference_mode cannot go through save_for_backward;
        # they are constants here, so keeping a plain reference loses nothing but the version check.
        ctx.inference_teacher = teacher if teacher.is_inference() else None
        ctx.save_for_backward(student, *([] if teacher.is_inference() else [teacher]))
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.fused:
            if ctx.grad is None:
                raise RuntimeError("the divergence's gradient was computed in its forward pass and is used "
                                   "once; a second backward through it needs retain_graph off")
            grad, ctx.grad = ctx.grad, None
            # Each row's weight: the sum of the output gradients of every place it was listed.
            rows = torch.cat([torch.arange(first, stop, device=grad.device) for first, stop, _ in ctx.segments])
            places = torch.cat([torch.arange(offset, offset + stop - first, device=grad.device)
                                for first, stop, offset in ctx.segments])
            weights = torch.zeros(grad.shape[0], dtype=grad_out.dtype, device=grad.device)
            weights.index_add_(0, rows, grad_out[places])
            return grad.mul_(weights[:, None]).to(ctx.dtype), None, None, None, None, None
        student, *saved = ctx.saved_tensors
        teacher = saved[0] if saved else ctx.inference_teacher
        grad = torch.zeros_like(student)
        for first, stop, offset in ctx.segments:
            _, g = ctx.chunk(student[first:stop].float(), teacher[first:stop].float(), ctx.weight, grad=True)
            # add_, not copy_: a row listed twice must receive both contributions.
            grad[first:stop].add_(g.mul_(grad_out[offset:offset + stop - first, None]))
        return grad, None, None, None, None, None


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
    return _chunked("jsd", student_logits, teacher_logits, beta, rows)


def cakld(student_logits: torch.Tensor, teacher_logits: torch.Tensor, gamma: float,
          rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token confidence-aware KL of BitDistiller: ``gamma * KL(student || teacher) +
    (1 - gamma) * KL(teacher || student)``, ``gamma`` being the teacher's mean confidence (its mean
    probability of the training completions' tokens, :func:`onpolicy_lib.distill.teacher_confidence`).

    A confident teacher weights the mode-seeking reverse KL, an uncertain one the mode-covering
    forward KL. Same conventions, chunking and analytic gradient as :func:`generalized_jsd`.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    return _chunked("cakld", student_logits, teacher_logits, gamma, rows)


def _chunked(kind: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, weight: float,
             rows: torch.Tensor | None) -> torch.Tensor:
    if teacher_logits.requires_grad:
        raise ValueError(f"{kind} treats the teacher logits as constants; pass them detached")
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.reshape(-1, vocab)
    ids = list(range(student.shape[0])) if rows is None else rows.tolist()
    budget = CHUNK_ELEMENTS if student.device.type == "cpu" else CHUNK_ELEMENTS_ACCELERATOR
    chunk = max(1, budget // vocab)
    return _ChunkedDivergence.apply(student, teacher, kind, float(weight), _segments(ids, chunk), len(ids))


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of ``targets`` (``[...]``) under ``logits`` (``[..., V]``), one fp32 value each.

    ``F.cross_entropy`` a slice of rows at a time, so only one slice is ever in fp32 (for a 262k
    vocabulary a whole batch's fp32 log-probabilities would be gigabytes). No gradient.
    """
    vocab = logits.shape[-1]
    flat, flat_targets = logits.reshape(-1, vocab), targets.reshape(-1)
    chunk = max(1, (CHUNK_ELEMENTS if logits.device.type == "cpu" else CHUNK_ELEMENTS_ACCELERATOR) // vocab)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    with torch.no_grad():
        for first in range(0, flat.shape[0], chunk):
            stop = first + chunk
            out[first:stop] = F.cross_entropy(flat[first:stop].float(), flat_targets[first:stop], reduction="none")
    return out.reshape(targets.shape)
