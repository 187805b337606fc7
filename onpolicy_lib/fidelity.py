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
    eos_token_ids,
    generate_completions,
)
from onpolicy_lib.divergence import generalized_jsd, token_nll

# The metrics this module measures, and how tables and figures name them. The ``_matched`` ones are
# the same metric on the first ``max_new_tokens`` completion positions only: the positions an
# on-policy student trains on, so off- and on-policy students are compared where both learned.
METRICS = {"forward_kl": "forward KL (dataset completions)",
           "forward_kl_matched": "forward KL, first max_new_tokens positions",
           "top1_agreement": "top-1 agreement",
           "top1_agreement_matched": "top-1 agreement, first max_new_tokens positions",
           "reverse_kl_on_policy": "reverse KL (own samples)",
           "teacher_nll_of_student_greedy": "teacher NLL of greedy output"}


@dataclass
class FidelityConfig:
    """How fidelity is measured; the generation settings are the run's own (:meth:`for_run`)."""

    samples: int = 32  # held-out examples (a stratified sample: see data.stratified_sample)
    max_new_tokens: int = 32  # the run's rollout length: also the length-matched window
    min_new_tokens: int = 0
    temperature: float = 0.9  # the run's rollout temperature, for the on-policy samples
    batch_size: int = 4
    seed: int = 0  # sampling seed of the on-policy completions: the same for every model compared
    # Batches are formed in order of prompt (then completion) length, which wastes little on padding;
    # "rows" (the held-out order) is how results before this option were measured. Part of the
    # baselines' cache key: the sampled completions depend on which rows share a batch.
    batch_order: str = "length"

    @classmethod
    def for_run(cls, run_cfg: dict[str, Any], samples: int) -> FidelityConfig:
        defaults = cls()
        return cls(samples=samples, **{k: run_cfg.get(k, getattr(defaults, k))
                                       for k in ("max_new_tokens", "min_new_tokens", "temperature")})


def completion_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits at positions ``P-1 .. T-1``, ``[B, C + 1, V]`` (position ``k`` predicts completion token
    ``k``; the last predicts nothing), and the completion mask ``[B, C]``.

    The extra last position is kept rather than sliced off: slicing would make every per-token
    reduction below copy the whole batch's logits, for a 262k vocabulary gigabytes.
    """
    logits = model(**completion_forward(batch)).logits
    return logits, batch["labels"][:, batch["prompt_ids"].shape[1]:] != IGNORE_INDEX


def _divergence(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token divergence ``[B, C]`` at the masked completion positions (0 elsewhere), read in place."""
    batch, width = mask.shape
    rows = F.pad(mask, (0, 1)).flatten().nonzero().squeeze(1)
    out = torch.zeros(batch * (width + 1), dtype=torch.float32, device=student.device)
    out[rows] = generalized_jsd(student, teacher, beta, rows=rows)
    return out.view(batch, width + 1)[:, :-1]


def _generate(model, batch, tokenizer, eos_ids, config: FidelityConfig, sample: bool) -> dict[str, torch.Tensor]:
    kwargs = ({"do_sample": True, "temperature": config.temperature, "top_k": 0, "top_p": 1.0} if sample
              else {"do_sample": False})
    return generate_completions(model, batch, tokenizer.pad_token_id, eos_ids, max_new_tokens=config.max_new_tokens,
                                min_new_tokens=config.min_new_tokens, **kwargs)


def _per_example(values: torch.Tensor, mask: torch.Tensor) -> list[float]:
    counts = mask.sum(-1).clamp(min=1)
    return ((values * mask).sum(-1) / counts).tolist()


# Each metric: the per-token values it averages and the mask of tokens it averages over.
_PARTS = {"forward_kl": ("fkl", "dataset"), "forward_kl_matched": ("fkl", "matched"),
          "top1_agreement": ("agree", "dataset"), "top1_agreement_matched": ("agree", "matched"),
          "reverse_kl_on_policy": ("rkl", "sampled"), "teacher_nll_of_student_greedy": ("nll", "greedy")}


@torch.no_grad()
def measure_fidelity(teacher: torch.nn.Module, student: torch.nn.Module, tokenizer, heldout: Dataset,
                     config: FidelityConfig | None = None) -> dict[str, Any]:
    """All fidelity metrics of ``student`` against ``teacher`` on tokenized held-out chats.

    ``heldout`` has ``prompt_ids``/``completion_ids`` (see ``data.tokenize_for_distillation``) and
    usually ``source``; its first ``config.samples`` rows are used. Each metric is a token-weighted
    mean, overall and per source (``by_source``). Pass the student in the form being judged (e.g.
    converted for deployment).
    """
    config = config or FidelityConfig()
    rows = heldout.select(range(min(config.samples, len(heldout))))
    collate = DistillCollator(tokenizer.pad_token_id)
    eos_ids = eos_token_ids(teacher, tokenizer)
    teacher.eval()
    student.eval()
    device = next(student.parameters()).device
    # sums[source][values] and tokens[source][mask], accumulated token by token.
    sums: dict[str, dict[str, float]] = {}
    tokens: dict[str, dict[str, int]] = {}
    if config.batch_order not in ("length", "rows"):
        raise ValueError(f"batch_order must be 'length' or 'rows'; got {config.batch_order!r}")
    order = list(range(len(rows)))
    if config.batch_order == "length":
        order.sort(key=lambda i: (len(rows[i]["prompt_ids"]), len(rows[i]["completion_ids"])))
    examples: dict[int, dict[str, Any]] = {}
    # One seed for all models compared, so their sampled completions differ only by the model.
    torch.manual_seed(config.seed)
    for start in range(0, len(rows), config.batch_size):
        indices = order[start:start + config.batch_size]
        batch_rows = [rows[i] for i in indices]
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(batch_rows).items()}

        s_logits, mask = completion_logits(student, batch)
        t_logits, _ = completion_logits(teacher, batch)
        fkl = _divergence(s_logits, t_logits, mask, beta=0.0)
        agree = (s_logits.argmax(-1) == t_logits.argmax(-1))[:, :-1].float()
        positions = torch.arange(mask.shape[1], device=mask.device)[None, :]
        matched = mask & (positions < config.max_new_tokens)

        sampled = _generate(student, batch, tokenizer, eos_ids, config, sample=True)
        s_logits, s_mask = completion_logits(student, sampled)
        t_logits, _ = completion_logits(teacher, sampled)
        rkl = _divergence(s_logits, t_logits, s_mask, beta=1.0)
        del s_logits

        greedy = _generate(student, batch, tokenizer, eos_ids, config, sample=False)
        t_logits, g_mask = completion_logits(teacher, greedy)
        targets = F.pad(greedy["input_ids"][:, batch["prompt_ids"].shape[1]:], (0, 1), value=0)
        nll = token_nll(t_logits, targets)[:, :-1]

        values = {"fkl": fkl, "agree": agree, "rkl": rkl, "nll": nll}
        masks = {"dataset": mask.float(), "matched": matched.float(), "sampled": s_mask.float(),
                 "greedy": g_mask.float()}
        for i, (index, row) in enumerate(zip(indices, batch_rows, strict=True)):
            source = row.get("source", "")
            example = {"id": row.get("id", index), "source": source}
            for metric, (value, part) in _PARTS.items():
                example[metric] = _per_example(values[value][i:i + 1], masks[part][i:i + 1])[0]
            examples[index] = example
            for key in ("all", source):
                acc, count = sums.setdefault(key, {}), tokens.setdefault(key, {})
                for metric, (value, part) in _PARTS.items():
                    acc[metric] = acc.get(metric, 0.0) + float((values[value][i] * masks[part][i]).sum())
                for part, part_mask in masks.items():
                    count[part] = count.get(part, 0) + int(part_mask[i].sum())

    per_example = [examples[i] for i in range(len(rows))]  # in the held-out order, whatever the batches

    def means(key: str) -> dict[str, float]:
        return {metric: sums[key][metric] / max(tokens[key][part], 1) for metric, (_, part) in _PARTS.items()}

    return {
        **means("all"),
        "by_source": {source: {**means(source), "examples": sum(e["source"] == source for e in per_example),
                               "tokens": tokens[source]}
                      for source in sorted(sums) if source != "all"},
        "examples": len(rows),
        "tokens": tokens.get("all", {}),
        "config": vars(config),
        "per_example": per_example,
    }
