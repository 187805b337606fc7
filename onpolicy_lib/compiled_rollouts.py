"""Rollouts through a compiled decode step of fixed shape (opt-in ``rollout_compile``).

A cached decode step of a small model on a CPU is a few hundred small operations around the
weight products (norms, RoPE, residuals, KV-cache growth, Python dispatch); compiled into one
graph they cost a fraction of that. ``torch.compile`` recompiles for every new input shape and
on every guard it fails, and a training run changes both: each rollout batch has its own prompt
width, and the student's weights are new tensors at every step (swapped, cast or shared by the
quantization contexts). So the compiled step runs on a *shadow*: a plain copy of the student's
architecture whose parameters are the same tensors for the whole run, refreshed in place from
the student's rollout weights (its fake-quantized weights, as the rollout would sample them)
before each rollout, with a static KV cache of one length for the whole run. Every decode step
then has the same shapes and the same guards, and compiles once per run (and per batch size).

Sampling is ``model.generate``'s for our settings (temperature, no top-k / top-p, ``min_new_tokens``
by masking the end-of-sequence ids, rows padded after their end), drawing from the same random
stream in the same order; the logits differ from the uncompiled forward's only by float rounding
(another summation order), so it samples the student's policy (tested against ``generate``).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, StaticCache
from transformers.cache_utils import StaticLayer

from onpolicy_lib.quantization import active_fake_quantized, weight_major_forward

CACHE_ROUNDING = 64  # a static cache sized from a first batch gets room for longer prompts


class CompiledSampler:
    """Samples completions from ``template``'s architecture with a compiled, fixed-shape decode step.

    ``template``: a plain model of the student's architecture (the teacher: the student is its
    quantized copy); copied once, in ``dtype``. ``max_cache_len``: prompt width plus new tokens
    the static cache holds (None: sized from the first batch, rounded up; a longer batch later
    grows it and compiles once more). ``weight_major``: decode products as ``W @ x^T``
    (:func:`~onpolicy_lib.quantization.weight_major_linear`). ``backend``: ``torch.compile``'s (None
    runs the same static-cache loop eagerly: a reference).
    """

    def __init__(self, template: PreTrainedModel, dtype: torch.dtype = torch.float32,
                 max_cache_len: int | None = None, weight_major: bool = False, backend: Any = "inductor") -> None:
        self.shadow = copy.deepcopy(template).to(dtype).eval().requires_grad_(False)
        if weight_major:
            for mod in self.shadow.modules():
                if type(mod) is nn.Linear:
                    # Bound once for the run, so the compiled graph's guards hold across rollouts.
                    mod.forward = weight_major_forward(mod)
        self.max_cache_len = max_cache_len
        self._step = (torch.compile(self.shadow.forward, dynamic=False, backend=backend) if backend is not None
                      else self.shadow.forward)
        self._caches: dict[int, StaticCache] = {}
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
        cache = self._cache(rows, width + max_new_tokens)
        cache.reset()
        mask = prompt_mask.new_zeros(rows, self.max_cache_len)
        mask[:, :width] = prompt_mask
        positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
        # The prefill (a new width every batch) runs eagerly; only the decode steps are compiled.
        logits = self.shadow(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, cache=cache,
                             cache_position=torch.arange(width, device=prompt_ids.device), use_cache=True,
                             logits_to_keep=1).logits[:, -1].float()
        position = positions[:, -1:] + 1
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
            slot = width + t
            mask[:, slot] = 1
            logits = self._step(input_ids=token[:, None], attention_mask=mask, position_ids=position, cache=cache,
                                cache_position=torch.tensor([slot], device=prompt_ids.device),
                                use_cache=True).logits[:, -1].float()
            position = position + 1
        return torch.cat([prompt_ids, torch.stack(tokens, dim=1)], dim=1)

    def _cache(self, rows: int, length: int) -> StaticCache:
        if self.max_cache_len is None or length > self.max_cache_len:
            # One length for the whole run where possible: a new length is a new compiled graph.
            self.max_cache_len = CACHE_ROUNDING * math.ceil(max(length, self.max_cache_len or 0) / CACHE_ROUNDING)
            self._caches.clear()
        if rows not in self._caches:
            cache = StaticCache(config=self.shadow.config, max_cache_len=self.max_cache_len)
            # Sliding-window layers' static cache keeps a Python int of its length, which the compiled
            # step would be specialised on (a new graph every token): keep every position instead, in
            # plain static layers; the model's sliding-window masks still restrict what they attend to.
            cache.layers = [StaticLayer(max_cache_len=self.max_cache_len) if layer.is_sliding else layer
                            for layer in cache.layers]
            self._caches[rows] = cache
        return self._caches[rows]
