"""Distillation fidelity: how close the student's distribution is to its teacher's.

Measured on the fixed held-out chat slice (never trained on), these are the
study's low-noise signals and the direct measure of the "distribution mismatch"
the original paper only hypothesised about:

* ``forward_kl`` — KL(teacher ‖ student) per token on the dataset's completions
  (teacher forcing: the off-policy view);
* ``top1_agreement`` — fraction of those positions where both argmaxes agree;
* ``reverse_kl_on_policy`` — KL(student ‖ teacher) per token on the student's
  own sampled completions (temperature 1: the on-policy view);
* ``teacher_nll_of_student_greedy`` — the teacher's mean negative log-likelihood
  per token of the student's greedy generations (how plausible the teacher finds
  what the student actually says).

All averages are over completion tokens; per-example values are kept for paired
comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset

from onpolicy_lib.batches import (
    IGNORE_INDEX,
    DistillCollator,
    completion_forward,
    generate_completions,
)
from onpolicy_lib.divergence import generalized_jsd

# The metrics this module measures, and how tables and figures name them.
METRICS = {"forward_kl": "forward KL (dataset completions)", "top1_agreement": "top-1 agreement",
           "reverse_kl_on_policy": "reverse KL (own samples)",
           "teacher_nll_of_student_greedy": "teacher NLL of greedy output"}


@dataclass
class FidelityConfig:
    samples: int = 32  # held-out examples
    max_new_tokens: int = 32
    batch_size: int = 4
    seed: int = 0  # sampling seed of the on-policy completions: the same for every model compared


def completion_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits predicting each completion token, ``[B, C, V]``, and the completion mask ``[B, C]``."""
    logits = model(**completion_forward(batch)).logits[:, :-1]
    return logits, batch["labels"][:, batch["prompt_ids"].shape[1]:] != IGNORE_INDEX


def _generate(model, batch, tokenizer, eos_ids, max_new_tokens, sample: bool) -> dict[str, torch.Tensor]:
    kwargs = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {"do_sample": False}
    return generate_completions(model, batch, tokenizer.pad_token_id, eos_ids, max_new_tokens=max_new_tokens,
                                **kwargs)


def _per_example(values: torch.Tensor, mask: torch.Tensor) -> list[float]:
    counts = mask.sum(-1).clamp(min=1)
    return ((values * mask).sum(-1) / counts).tolist()


@torch.no_grad()
def measure_fidelity(teacher: torch.nn.Module, student: torch.nn.Module, tokenizer, heldout: Dataset,
                     config: FidelityConfig | None = None) -> dict[str, Any]:
    """All four fidelity metrics of ``student`` against ``teacher`` on tokenized held-out chats.

    ``heldout`` has ``prompt_ids``/``completion_ids`` (see ``data.tokenize_for_distillation``).
    Pass the student in the form being judged (e.g. converted for deployment).
    """
    config = config or FidelityConfig()
    rows = heldout.select(range(min(config.samples, len(heldout))))
    collate = DistillCollator(tokenizer.pad_token_id)
    eos_ids = [tokenizer.eos_token_id]
    teacher.eval()
    student.eval()
    totals = {"fkl": 0.0, "agree": 0.0, "rkl": 0.0, "nll": 0.0}
    tokens = {"dataset": 0, "sampled": 0, "greedy": 0}
    per_example: list[dict[str, Any]] = []
    # One seed for all models compared, so their sampled completions differ only by the model.
    torch.manual_seed(config.seed)
    for start in range(0, len(rows), config.batch_size):
        batch = collate([rows[i] for i in range(start, min(start + config.batch_size, len(rows)))])

        s_logits, mask = completion_logits(student, batch)
        t_logits, _ = completion_logits(teacher, batch)
        fkl = generalized_jsd(s_logits, t_logits, beta=0.0).reshape(mask.shape)
        agree = (s_logits.argmax(-1) == t_logits.argmax(-1)).float()

        sampled = _generate(student, batch, tokenizer, eos_ids, config.max_new_tokens, sample=True)
        s_logits, s_mask = completion_logits(student, sampled)
        t_logits, _ = completion_logits(teacher, sampled)
        rkl = generalized_jsd(s_logits, t_logits, beta=1.0).reshape(s_mask.shape)

        greedy = _generate(student, batch, tokenizer, eos_ids, config.max_new_tokens, sample=False)
        t_logits, g_mask = completion_logits(teacher, greedy)
        targets = greedy["input_ids"][:, batch["prompt_ids"].shape[1]:]
        nll = -F.log_softmax(t_logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

        maskf, s_maskf, g_maskf = mask.float(), s_mask.float(), g_mask.float()
        totals["fkl"] += float((fkl * maskf).sum())
        totals["agree"] += float((agree * maskf).sum())
        totals["rkl"] += float((rkl * s_maskf).sum())
        totals["nll"] += float((nll * g_maskf).sum())
        tokens["dataset"] += int(mask.sum())
        tokens["sampled"] += int(s_mask.sum())
        tokens["greedy"] += int(g_mask.sum())
        for i, (a, b, c, d) in enumerate(zip(_per_example(fkl, maskf), _per_example(agree, maskf),
                                             _per_example(rkl, s_maskf), _per_example(nll, g_maskf), strict=True)):
            row = rows[start + i]
            per_example.append({"id": row.get("id", start + i), "forward_kl": a, "top1_agreement": b,
                                "reverse_kl_on_policy": c, "teacher_nll_of_student_greedy": d})
    return {
        "forward_kl": totals["fkl"] / max(tokens["dataset"], 1),
        "top1_agreement": totals["agree"] / max(tokens["dataset"], 1),
        "reverse_kl_on_policy": totals["rkl"] / max(tokens["sampled"], 1),
        "teacher_nll_of_student_greedy": totals["nll"] / max(tokens["greedy"], 1),
        "examples": len(rows),
        "tokens": tokens,
        "config": vars(config),
        "per_example": per_example,
    }
