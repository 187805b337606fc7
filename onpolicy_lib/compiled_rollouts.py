"""Rollouts through a compiled decode step of fixed shape (opt-in ``rollout_compile``).

A cached decode step of a small model on a CPU is a few hundred small operations around the
weight products (norms, RoPE, residuals, KV-cache growth, Python dispatch); compiled into one
graph they cost a fraction of that. ``torch.compile`` recompiles for every new input shape and
on every guard it fails, and a training run changes both: each rollout batch has its own prompt
width, and the student's weights are new tensors at every step (swapped, cast or shared by the
quantization contexts). So the compiled step runs on a *shadow*: a plain copy of the student's
architecture whose parameters are the same tensors for the whole run, refreshed in place from
the student's rollout weights (its fake-quantized weights, as the rollout would sample them)
before each rollout, with a static KV cache sized to what the batch needs (prompt width plus new
tokens), rounded up to a few lengths (:func:`cache_bucket`). Every decode step then has the same
shapes and guards as an earlier one of its length, and compiles once per cache length and batch
size in a run (a handful of graphs, not one per batch). A static cache's attention reads all of its
slots at every step, so a cache sized to the longest possible prompt would make every short
batch's steps read up to several times the KV bytes they need.

Sampling is ``model.generate``'s for our settings (temperature, no top-k / top-p, ``min_new_tokens``
by masking the end-of-sequence ids, rows padded after their end), drawing from the same random
stream in the same order; the logits differ from the uncompiled forward's only by float rounding
(another summation order), so it samples the student's policy (tested against ``generate``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, StaticCache
from transformers.cache_utils import StaticLayer

from onpolicy_lib.quantization import active_fake_quantized

CACHE_ROUNDING = 64  # the smallest cache length step


def cache_bucket(length: int) -> int:
    """The static cache length for a batch needing ``length`` positions: the next of 64, 96, 128, 192, 256,
    384, ... (powers of two and 1.5 times them, multiples of 64): at most 1.5x the positions needed, and
    few distinct lengths (graphs) over a run's batches."""
    full = CACHE_ROUNDING * 2 ** max(0, math.ceil(math.log2(length / CACHE_ROUNDING)))
    return full * 3 // 4 if full >= 4 * CACHE_ROUNDING and full * 3 // 4 >= length else full


class CompiledSampler:
    """Samples completions from ``template``'s architecture with a compiled, fixed-shape decode step.

    ``template``: a plain model of the student's architecture (the teacher: the student is its
    quantized copy); copied once, in ``dtype``. ``max_cache_len``: prompt width plus new tokens
    the static cache holds, fixed for the run (None: each batch's prompt width plus new tokens, rounded up
    by :func:`cache_bucket`). ``linear_forward``: for each plain Linear of the copy, the forward its
    decode steps use instead of the class's (:func:`~onpolicy_lib.rollouts.weight_major_forward` for the
    weight-major form; None: ``F.linear``). ``backend``: ``torch.compile``'s (None
    runs the same static-cache loop eagerly: a reference).
    """

    def __init__(self, template: PreTrainedModel, dtype: torch.dtype = torch.float32,
                 max_cache_len: int | None = None,
                 linear_forward: Callable[[nn.Linear], Callable[[torch.Tensor], torch.Tensor]] | None = None,
                 backend: Any = "inductor") -> None:
        self.shadow = copy.deepcopy(template).to(dtype).eval().requires_grad_(False)
        if linear_forward is not None:
            for mod in self.shadow.modules():
                if type(mod) is nn.Linear:
                    # Bound once for the run, so the compiled graph's guards hold across rollouts.
                    mod.forward = linear_forward(mod)
        self.max_cache_len = max_cache_len
        self._step = (torch.compile(self.shadow.forward, dynamic=False, backend=backend) if backend is not None
                      else self.shadow.forward)
        self._caches: dict[tuple[int, int], StaticCache] = {}
        self._modules = dict(self.shadow.named_modules())
        self._params = dict(self.shadow.named_parameters(remove_duplicate=False))

    @torch.no_grad()
    def refresh(self, student: nn.Module) -> None:
        """Copy ``student``'s rollout weights into the shadow in place: each active fake-quantized
        weight as its quantizer gives it (inside an on-policy step, the step's shared tensor),
        every other parameter as it is. Names are the student's (a plain model with its Linear
        layers swapped for fake-quantized ones)."""
        names = {id(mod): name for name, mod in student.named_modules()}
        quantized = set()
        for mod, quantizer in active_fake_quantized(student):
            name = names[id(mod)]
            target = self._modules[name]
            if sum(p is target.weight for p in self._params.values()) > 1:
                # A quantized head tied to the input embedding: the embedding stays full precision.
                target.weight = nn.Parameter(target.weight.detach().clone(), requires_grad=False)
                self._params = dict(self.shadow.named_parameters(remove_duplicate=False))
            target.weight.copy_(quantizer(mod.weight))
            quantized.add(f"{name}.weight" if name else "weight")
        for name, param in student.named_parameters(remove_duplicate=False):
            if name in quantized:
                continue
            if name not in self._params:
                raise ValueError(f"rollout_compile: the student's parameter {name!r} has no counterpart in the "
                                 "teacher's architecture (LoRA or another wrapper?): compiled rollouts need a "
                                 "plain quantization-aware student")
            self._params[name].copy_(param)

    @torch.no_grad()
    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, eos_token_ids: list[int],
               pad_token_id: int, temperature: float, max_new_tokens: int, min_new_tokens: int = 0) -> torch.Tensor:
        """``generate``'s ``sequences`` for left-padded prompts: prompt columns, then the sampled tokens
        (rows padded after their end-of-sequence token; as many columns as the longest row needs)."""
        rows, width = prompt_ids.shape
        cache, mask, position, logits = self._prefill(prompt_ids, prompt_mask, width + max_new_tokens)
        eos = torch.tensor(eos_token_ids, dtype=torch.long, device=prompt_ids.device)
        unfinished = torch.ones(rows, dtype=torch.bool, device=prompt_ids.device)
        tokens = []
        for t in range(max_new_tokens):
            if t < min_new_tokens:
                logits[:, eos] = -math.inf
            probs = torch.softmax(logits / temperature, dim=-1)
            token = torch.multinomial(probs, num_samples=1).squeeze(1)
            token = torch.where(unfinished, token, torch.full_like(token, pad_token_id))
            tokens.append(token)
            unfinished &= ~torch.isin(token, eos)
            if t == max_new_tokens - 1 or not unfinished.any():
                break
            logits = self._decode(cache, mask, token, position, width + t)
            position = position + 1
        return torch.cat([prompt_ids, torch.stack(tokens, dim=1)], dim=1)

    @torch.no_grad()
    def forced_decode(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      forced: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """Feed ``forced``'s tokens after the prompt, one compiled decode step each: the next-token logits of
        every step ``[steps, rows, vocab]`` and each step's seconds (what ``auto`` and the benchmark time)."""
        width, steps = prompt_ids.shape[1], forced.shape[1]
        cache, mask, position, _ = self._prefill(prompt_ids, prompt_mask, width + steps)
        seen, seconds = [], []
        for t in range(steps):
            start = time.perf_counter()
            seen.append(self._decode(cache, mask, forced[:, t], position, width + t))
            seconds.append(time.perf_counter() - start)
            position = position + 1
        return torch.stack(seen), seconds

    def _prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 length: int) -> tuple[StaticCache, torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, width = prompt_ids.shape
        cache, cache_len = self._cache(rows, length)
        cache.reset()
        mask = prompt_mask.new_zeros(rows, cache_len)
        mask[:, :width] = prompt_mask
        positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
        # The prefill (a new width every batch) runs eagerly; only the decode steps are compiled.
        logits = self.shadow(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, cache=cache,
                             cache_position=torch.arange(width, device=prompt_ids.device), use_cache=True,
                             logits_to_keep=1).logits[:, -1].float()
        return cache, mask, positions[:, -1:] + 1, logits

    def _decode(self, cache: StaticCache, mask: torch.Tensor, token: torch.Tensor, position: torch.Tensor,
                slot: int) -> torch.Tensor:
        mask[:, slot] = 1
        return self._step(input_ids=token[:, None], attention_mask=mask, position_ids=position, cache=cache,
                          cache_position=torch.tensor([slot], device=token.device),
                          use_cache=True).logits[:, -1].float()

    def _cache(self, rows: int, length: int) -> tuple[StaticCache, int]:
        if self.max_cache_len is not None and length > self.max_cache_len:
            raise ValueError(f"a rollout of {length} positions does not fit the fixed cache of {self.max_cache_len}")
        cache_len = self.max_cache_len or cache_bucket(length)
        if (rows, cache_len) not in self._caches:
            cache = StaticCache(config=self.shadow.config, max_cache_len=cache_len)
            # Sliding-window layers' static cache keeps a Python int of its length, which the compiled
            # step would be specialised on (a new graph every token): keep every position instead, in
            # plain static layers; the model's sliding-window masks still restrict what they attend to.
            cache.layers = [StaticLayer(max_cache_len=cache_len) if layer.is_sliding else layer
                            for layer in cache.layers]
            self._caches[rows, cache_len] = cache
        return self._caches[rows, cache_len], cache_len
