"""A student's evaluation against the forward passes it needs.

A student's evaluation (``evaluate.evaluate_model``: benchmarks, perplexity, fidelity) is mostly
forward passes, plus the fidelity metrics' generation. This times each part in the form a student
is evaluated in (converted, dequantized for evaluation: a round-to-nearest copy of the teacher has
exactly its cost), and sets it against the arithmetic it cannot avoid:

* **scoring**: every token the part puts through a forward, padding excluded, at the model's
  measured forward throughput (one ``[8, 256]`` batch, the logits of its last position only);
* **generation**: every decode step the part takes at the measured time of one cached decode step
  of its batch (so generation counts as fast as this machine decodes, whatever that is: the decode
  step's own distance from the hardware is the benchmark's decode block).

The ratio ``wall / needed`` is the part's overhead: model calls on padding, logits nobody reads,
data loading and Python around the forwards.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from onpolicy_lib.speed.hardware import decode_step
from onpolicy_lib.speed.timing import sync, timed

if TYPE_CHECKING:
    from onpolicy_lib.config import EvalConfig
    from onpolicy_lib.evaluate import Fidelity

PARTS = ("benchmarks", "perplexity", "fidelity")
THROUGHPUT_SHAPE = (8, 256)


@dataclass
class ForwardMeter:
    """Seconds spent in a model's forward calls, split into scoring and generation, and their tokens."""

    device: torch.device
    score_s: float = 0.0
    score_calls: int = 0
    score_tokens: int = 0  # real tokens: padding excluded
    padded_tokens: int = 0  # the tensors' sizes, padding included
    generate_s: float = 0.0  # inside model.generate, all of it
    prefill_tokens: int = 0
    decode_rows: list[int] = field(default_factory=list)  # the rows of each decode step
    _generating: bool = False

    def record(self, seconds: float, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> None:
        if input_ids is None:
            return
        if self._generating:
            if input_ids.shape[1] == 1 and self.prefill_tokens:
                self.decode_rows.append(input_ids.shape[0])
            else:
                self.prefill_tokens += _real_tokens(input_ids, attention_mask)
            return
        self.score_s += seconds
        self.score_calls += 1
        self.score_tokens += _real_tokens(input_ids, attention_mask)
        self.padded_tokens += input_ids.numel()


def _real_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> int:
    if attention_mask is not None and attention_mask.shape == input_ids.shape:
        return int(attention_mask.sum())
    # lm-eval right-pads with id 0 and passes no mask: a row's length is up to its last non-zero id
    # (an undercount only if a continuation ended in token 0, a special token in these vocabularies).
    nonzero = input_ids != 0
    last = torch.where(nonzero.any(1), input_ids.shape[1] - nonzero.flip(1).int().argmax(1), 0)
    return int(last.sum())


@contextmanager
def metered(model: torch.nn.Module, meter: ForwardMeter) -> Iterator[ForwardMeter]:
    """Route ``model``'s forward and generate calls through ``meter`` while the context is open."""
    forward, generate = model.forward, model.generate

    @functools.wraps(forward)
    def timed_forward(*args: Any, **kwargs: Any) -> Any:
        sync(meter.device)
        start = time.perf_counter()
        out = forward(*args, **kwargs)
        sync(meter.device)
        meter.record(time.perf_counter() - start, kwargs.get("input_ids", args[0] if args else None),
                     kwargs.get("attention_mask"))
        return out

    @functools.wraps(generate)
    def timed_generate(*args: Any, **kwargs: Any) -> Any:
        meter._generating, start = True, time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            meter._generating = False
            meter.generate_s += time.perf_counter() - start

    model.forward, model.generate = timed_forward, timed_generate
    try:
        yield meter
    finally:
        del model.forward, model.generate  # the instance attributes; the class's methods are back


def eval_config(limit: int) -> EvalConfig:
    """The evaluation the benchmark times: the five benchmarks at ``limit`` documents (MMLU one per subject),
    perplexity on 4096 tokens, fidelity on 8 held-out chats; nothing cached or written."""
    from onpolicy_lib.config import EvalConfig

    return EvalConfig(run_dirs=[], limit=limit, mmlu_limit=1, task_limits={}, fidelity_samples=8,
                      perplexity_tokens=4096, include_teacher=False, include_ptq=False)


@torch.no_grad()
def forward_throughput(model: torch.nn.Module, device: torch.device, repeats: int = 3) -> float:
    """Tokens/s of a forward over a ``[8, 256]`` batch, logits at its last position only."""
    ids = torch.randint(0, model.config.vocab_size, THROUGHPUT_SHAPE, device=device)
    seconds = timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), repeats, 1, device).median
    return ids.numel() / seconds


def evaluation_figures(student: torch.nn.Module, teacher: torch.nn.Module, tokenizer: Any, eval_cfg: EvalConfig,
                       fidelity: Fidelity, device: torch.device) -> dict[str, Any]:
    """Each part of ``student``'s evaluation timed, beside the forward passes it needs (see the module)."""
    from onpolicy_lib.evaluate import evaluate_model

    throughput = {"student": forward_throughput(student, device), "teacher": forward_throughput(teacher, device)}
    figures: dict[str, Any] = {"forward_tokens_per_s": throughput["student"],
                               "teacher_forward_tokens_per_s": throughput["teacher"]}
    decode_s: dict[int, float] = {}
    for part in PARTS:
        meters = {"student": ForwardMeter(device), "teacher": ForwardMeter(device)}
        with metered(student, meters["student"]), metered(teacher, meters["teacher"]):
            sync(device)
            start = time.perf_counter()
            evaluate_model(student, tokenizer, eval_cfg, teacher, fidelity, device, parts=(part,))
            sync(device)
            wall = time.perf_counter() - start
        for rows in sorted({r for m in meters.values() for r in m.decode_rows} - set(decode_s)):
            # What a decode step costs does not depend on the tokens, only on the rows and the cache length.
            prompt = torch.randint(0, student.config.vocab_size, (rows, 96), device=device)
            decode_s[rows] = decode_step(student, prompt, torch.ones_like(prompt), device)
        scoring = sum(m.score_tokens / throughput[name] for name, m in meters.items())
        prefill = sum(m.prefill_tokens / throughput[name] for name, m in meters.items())
        decode = sum(decode_s[r] for m in meters.values() for r in m.decode_rows)
        needed = scoring + prefill + decode
        figures[part] = {
            "wall_s": wall, "needed_s": needed, "wall_over_needed": wall / needed if needed else None,
            "forward_s": sum(m.score_s for m in meters.values()),
            "generate_s": sum(m.generate_s for m in meters.values()),
            "needed_scoring_s": scoring, "needed_generation_s": prefill + decode,
            "tokens_scored": sum(m.score_tokens for m in meters.values()),
            "tokens_padded": sum(m.padded_tokens for m in meters.values()),
            "forward_calls": sum(m.score_calls for m in meters.values()),
            "decode_steps": sum(len(m.decode_rows) for m in meters.values()),
        }
    measured = [figures[p] for p in PARTS]
    wall, needed = sum(f["wall_s"] for f in measured), sum(f["needed_s"] for f in measured)
    figures["total"] = {"wall_s": wall, "needed_s": needed, "wall_over_needed": wall / needed if needed else None}
    figures["decode_step_s"] = {str(rows): s for rows, s in decode_s.items()}
    figures["settings"] = {k: getattr(eval_cfg, k) for k in ("tasks", "limit", "mmlu_limit", "task_limits",
                                                             "batch_size", "perplexity_tokens", "fidelity_samples")}
    return figures
