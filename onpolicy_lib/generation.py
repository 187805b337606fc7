"""Batched generation for evaluation: many prompts, full-length outputs, greedy or sampled.

:func:`generate_texts` puts prompts of similar length in one batch (left-padded, so little is spent on
padding), generates with a KV cache, and returns the results in the input order. Each row stops at its
end (an end-of-sequence token, or ``max_new_tokens``).

The decode loop is our own rather than ``model.generate``'s, for two reasons that matter when answers
of very different lengths share a batch (a math answer of 60 tokens beside one that runs to the cap):

* **finished rows leave the batch.** ``generate`` keeps decoding every row, padding the finished
  ones, until the last row ends; here the batch (and its cache) is compacted once enough rows have
  ended (:data:`COMPACT_FRACTION`), so their weight of compute and cache reads is not spent;
* **the cache is preallocated** for what the batch needs (its prompt width plus ``max_new_tokens``)
  and filled in place; ``DynamicCache`` grows by concatenation, copying the whole cache at every
  step, which at long outputs costs as much memory traffic as the attention itself.

Greedy decoding is ``generate``'s (argmax of the logits). Sampling is pure temperature sampling
(no top-k or top-p: the training rollouts' rule) with **one random generator per prompt**, seeded
from ``seed`` and the prompt's position in the input list (:func:`row_seed`): a prompt's sample
does not depend on which prompts share its batch, on ``batch_size`` or on when the others end, and
every model compared draws from the same stream for the same prompt. A prompt sampled alone with
``generate`` after ``torch.manual_seed(row_seed(seed, i))`` gives the same tokens (up to float
rounding of the logits, which differs between batch shapes in the last bits).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from onpolicy_lib.batches import eos_token_ids as model_eos_token_ids

# A batch's prefill is split into groups of similar prompt length where one forward over the batch would
# spend more than this fraction of its real tokens on padding (a forward costs every position it is given).
PREFILL_PADDING = 0.25
# Finished rows are kept (decoding padding) until they are this fraction of the batch's rows: compacting
# copies every remaining row's cache once, about what two or three decode steps read, so one early row
# out of 32 is not worth it; an eighth of the batch repays the copy within a few dozen steps.
COMPACT_FRACTION = 1 / 8
MATMULS = ("linear", "packed")  # a decode step's products (generate_texts' matmul)


@dataclass
class Generation:
    """One prompt's output: the generated ids (ending with the end-of-sequence id if it ended on one),
    their text (special tokens skipped), whether it stopped at ``max_new_tokens`` without ending, and
    the prompt's length in tokens."""

    token_ids: list[int]
    text: str
    hit_cap: bool
    prompt_tokens: int


@dataclass
class GenerationStats:
    """What a generation did, for the speed benchmark: times, and each decode step's rows and cache length."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    compact_s: float = 0.0
    prefill_tokens: int = 0  # real prompt tokens (padding excluded)
    prefill_padded: int = 0  # the prefill tensors' sizes, padding included
    steps: list[tuple[int, int]] = field(default_factory=list)  # (rows, key/value positions) per decode step
    generated_tokens: int = 0  # tokens kept in the outputs (what finished rows decode is not counted)
    # Per batch, each row's (prompt tokens, generated tokens): the work an ideal schedule of the batch does.
    batch_rows: list[list[tuple[int, int]]] = field(default_factory=list)


def row_seed(seed: int, index: int) -> int:
    """The seed of prompt ``index``'s random generator (distinct streams for every ``(seed, index)``)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def encode_prompts(tokenizer: Any, prompts: Sequence[Any]) -> list[list[int]]:
    """Token ids of each prompt: a chat (a list of ``{"role", "content"}`` messages) through the chat
    template with the generation prompt, as training prompts are built; a string as plain text (the
    tokenizer's own special tokens, no template); a list of ints as it is."""
    encoded = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            ids = tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
            ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
            if isinstance(ids, Mapping):
                ids = ids["input_ids"]
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(t, int) for t in prompt):
            ids = prompt
        else:
            raise ValueError(f"prompts[{i}] must be a chat (a list of message dicts), a string or a list of token "
                             f"ids; got {type(prompt).__name__} {str(prompt)[:60]!r}")
        if not ids:
            raise ValueError(f"prompts[{i}] encodes to no tokens")
        encoded.append(list(ids))
    return encoded


def generate_texts(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Any], *, max_new_tokens: int,
                   temperature: float = 0.0, seed: int = 0, batch_size: int = 16,
                   eos_token_ids: Sequence[int] | None = None,
                   stats: GenerationStats | None = None, matmul: str = "linear") -> list[Generation]:
    """Generate a completion for every prompt, batched and length-sorted; results in the input order.

    ``prompts``: chats, strings or token-id lists (:func:`encode_prompts`). ``temperature`` 0 is greedy,
    above 0 samples at that temperature with a per-prompt generator (:func:`row_seed`). ``eos_token_ids``:
    the ids that end a row (default: the tokenizer's and the model's generation config's). ``stats``:
    filled with times and the decode steps' shapes (see :class:`GenerationStats`). ``matmul``: the decode
    steps' products, ``linear`` (``F.linear``) or ``packed`` (full-precision weights reordered once for
    oneDNN, :func:`onpolicy_lib.rollouts.packed_rollout`; equal within float rounding).
    """
    eos = list(eos_token_ids) if eos_token_ids is not None else model_eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    ids = encode_prompts(tokenizer, prompts)
    outputs = generate_ids(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                           batch_size=batch_size, eos_token_ids=eos, pad_token_id=pad, stats=stats, matmul=matmul)
    return [Generation(tokens, tokenizer.decode(tokens, skip_special_tokens=True), hit_cap, len(prompt))
            for (tokens, hit_cap), prompt in zip(outputs, ids, strict=True)]


@torch.no_grad()
def generate_ids(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                 eos_token_ids: Sequence[int], pad_token_id: int, temperature: float = 0.0, seed: int = 0,
                 batch_size: int = 16, stats: GenerationStats | None = None,
                 matmul: str = "linear") -> list[tuple[list[int], bool]]:
    """:func:`generate_texts` on token ids: ``(generated ids, hit_cap)`` per prompt, in the input order."""
    from onpolicy_lib.rollouts import packed_available, packed_rollout

    if matmul not in MATMULS:
        raise ValueError(f"matmul must be one of {', '.join(MATMULS)}; got {matmul!r}")
    if matmul == "packed" and not packed_available():
        raise ValueError("matmul 'packed' needs a torch built with oneDNN (this one is not): use 'linear'")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer; got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    if not temperature >= 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy); got {temperature!r}")
    if not prompt_ids:
        return []
    # Longest first: a batch that does not fit in memory fails at once, not at the end.
    order = sorted(range(len(prompt_ids)), key=lambda i: (-len(prompt_ids[i]), i))
    results: list[tuple[list[int], bool] | None] = [None] * len(prompt_ids)
    was_training = model.training
    model.eval()
    try:
        with packed_rollout(model) if matmul == "packed" else contextlib.nullcontext():
            _generate_all(model, prompt_ids, order, results, batch_size, max_new_tokens=max_new_tokens,
                          eos=set(eos_token_ids), pad=pad_token_id, temperature=temperature, seed=seed, stats=stats)
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def _generate_all(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], order: list[int], results: list,
                  batch_size: int, **settings: Any) -> None:
    """:func:`generate_ids`' batches, in ``order``, each result written into ``results`` at its input index."""
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        batch = _generate_batch(model, [prompt_ids[i] for i in indices], indices, **settings)
        for index, result in zip(indices, batch, strict=True):
            results[index] = result


class _PreallocatedLayer(DynamicLayer):
    """A cache layer whose keys and values live in storage sized once for the batch, written in place.

    ``keys``/``values`` are views of the filled positions, so attention reads only those; dropping
    rows (:meth:`batch_select_indices`) copies the filled part of the kept rows into new storage.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, heads, _, _ = key_states.shape
        self.device = key_states.device
        self._keys = key_states.new_empty((rows, heads, self.capacity, key_states.shape[-1]))
        self._values = value_states.new_empty((rows, value_states.shape[1], self.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"the preallocated cache holds {self.capacity} positions; {end} were asked for")
        self._keys[:, :, self.length:end].copy_(key_states)
        self._values[:, :, self.length:end].copy_(value_states)
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        self.length = 0
        self.keys = self.values = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the generation cache is not cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("the generation cache is not repeated")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        for name in ("_keys", "_values"):
            old = getattr(self, name)
            new = old.new_empty((len(indices), *old.shape[1:]))
            new[:, :, :self.length] = old[indices, :, :self.length]
            setattr(self, name, new)
        self.keys, self.values = self._keys[:, :, :self.length], self._values[:, :, :self.length]

    reorder_cache = batch_select_indices

    def place(self, rows: torch.Tensor, offset: int, keys: torch.Tensor, values: torch.Tensor, batch_rows: int,
              length: int) -> None:
        """Write a group of rows' prefill keys and values at positions ``offset ..`` of those rows; the
        cache then holds ``length`` positions. Storage is zeroed when allocated: a left-padding position
        no group writes is masked, but its value is still multiplied by a zero weight, so it must be finite."""
        if not self.is_initialized:
            self.device = keys.device
            self._keys = keys.new_zeros((batch_rows, keys.shape[1], self.capacity, keys.shape[-1]))
            self._values = values.new_zeros((batch_rows, values.shape[1], self.capacity, values.shape[-1]))
            self.is_initialized = True
        self._keys[rows, :, offset:offset + keys.shape[-2]] = keys
        self._values[rows, :, offset:offset + values.shape[-2]] = values
        self.length = length
        self.keys, self.values = self._keys[:, :, :length], self._values[:, :, :length]


def _preallocated_cache(model: torch.nn.Module, capacity: int) -> DynamicCache:
    """A ``DynamicCache`` for ``model`` whose every layer keeps all ``capacity`` positions in place.

    Sliding-window layers keep every position too: their masks still restrict what they attend to
    (the model builds them from positions), and a batch's cache is short-lived.
    """
    cache = DynamicCache(config=model.config)
    if not cache.layers:  # a config without layer types: one layer per hidden layer
        cache.layers = [DynamicLayer() for _ in range(model.config.get_text_config(decoder=True).num_hidden_layers)]
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer):
            raise ValueError("generation supports attention caches only; this model's cache has "
                             f"{type(layer).__name__}")
    cache.layers = [_PreallocatedLayer(capacity) for _ in cache.layers]
    return cache


def prefill_groups(lengths: Sequence[int], slack: float | None = None) -> list[list[int]]:
    """Rows of a batch grouped for the prefill, longest first, each group padded to its own longest
    prompt by at most ``slack`` (default :data:`PREFILL_PADDING`) of its real tokens; one group where
    the whole batch is within that."""
    slack = PREFILL_PADDING if slack is None else slack
    order = sorted(range(len(lengths)), key=lambda r: (-lengths[r], r))
    groups: list[list[int]] = []
    tokens = 0
    for r in order:
        if groups and lengths[groups[-1][0]] * (len(groups[-1]) + 1) <= (1 + slack) * (tokens + lengths[r]):
            groups[-1].append(r)
            tokens += lengths[r]
        else:
            groups.append([r])
            tokens = lengths[r]
    return groups


def _prefill(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
             cache: DynamicCache, lengths: list[int]) -> tuple[torch.Tensor, int]:
    """The last position's logits of every row after its prompt, its keys and values in ``cache``; and the
    tokens the prefill computed (padding included).

    A batch's prompts differ in length, and a prefill is arithmetic on every position, padding included:
    rows far shorter than the batch's longest are run in groups of similar length
    (:func:`prefill_groups`), and their keys and values placed in the batch's cache at their left-padded
    positions (the padding positions before them zeroed, never attended to).
    """
    rows, width = input_ids.shape
    groups = prefill_groups(lengths)
    if len(groups) == 1:
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        return logits, rows * width
    logits = None
    padded = 0
    for group in groups:
        group_width = lengths[group[0]]
        where = torch.tensor(group, device=input_ids.device)
        part = _preallocated_cache(model, group_width)
        out = model(input_ids=input_ids[where, width - group_width:], attention_mask=mask[where, width - group_width:],
                    position_ids=positions[where, width - group_width:], cache=part, use_cache=True,
                    logits_to_keep=1).logits[:, -1]
        if logits is None:
            logits = out.new_empty((rows, out.shape[-1]))
        logits[where] = out
        for layer, source in zip(cache.layers, part.layers, strict=True):
            layer.place(where, width - group_width, source.keys, source.values, rows, width)
        padded += len(group) * group_width
    return logits, padded


def _generate_batch(model: torch.nn.Module, prompts: list[Sequence[int]], indices: list[int], *, max_new_tokens: int,
                    eos: set[int], pad: int, temperature: float, seed: int,
                    stats: GenerationStats | None) -> list[tuple[list[int], bool]]:
    device = next(model.parameters()).device
    rows, width = len(prompts), max(map(len, prompts))
    input_ids = torch.full((rows, width), pad, dtype=torch.long, device=device)
    # The mask holds every position the batch can reach; step t passes its first width + t + 1 columns.
    mask = torch.zeros((rows, width + max_new_tokens), dtype=torch.long, device=device)
    for r, prompt in enumerate(prompts):
        input_ids[r, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[r, width - len(prompt):width] = 1
    # Left-padded prompts: positions count real tokens only, as generate does.
    positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
    cache = _preallocated_cache(model, width + max_new_tokens - 1)  # the last token is never fed back
    generators = ([torch.Generator(device=device).manual_seed(row_seed(seed, i)) for i in indices]
                  if temperature > 0 else None)

    start = time.perf_counter()
    lengths = [len(p) for p in prompts]
    logits, padded = _prefill(model, input_ids, mask[:, :width], positions, cache, lengths)
    next_position = positions[:, -1:] + 1
    outputs: list[list[int]] = [[] for _ in range(rows)]
    ended = [False] * rows
    live = list(range(rows))  # the batch row of each cache row
    if stats is not None:
        stats.prefill_s += time.perf_counter() - start
        stats.prefill_tokens += sum(lengths)
        stats.prefill_padded += padded
        start = time.perf_counter()
    for step in range(max_new_tokens):
        if generators is None:
            token = logits.argmax(-1)
        else:
            # generate's sampling, row by row from each prompt's own generator; an ended row (kept until
            # the batch is compacted) draws nothing and is fed padding.
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            token = torch.cat([torch.multinomial(probs[j:j + 1], 1, generator=generators[r]).view(1)
                               if not ended[r] else probs.new_full((1,), pad, dtype=torch.long)
                               for j, r in enumerate(live)])
        chosen = token.tolist()
        for j, r in enumerate(live):
            if not ended[r]:
                outputs[r].append(chosen[j])
                ended[r] = chosen[j] in eos
        if step == max_new_tokens - 1:
            break
        done = sum(ended[r] for r in live)
        if done == len(live):
            break
        if done >= max(1, COMPACT_FRACTION * len(live)):
            keep = [j for j, r in enumerate(live) if not ended[r]]
            compact_start = time.perf_counter()
            where = torch.tensor(keep, device=device)
            cache.batch_select_indices(where)
            token, mask, next_position = token[where], mask[where], next_position[where]
            live = [live[j] for j in keep]
            if stats is not None:
                stats.compact_s += time.perf_counter() - compact_start
        if stats is not None:
            stats.steps.append((len(live), width + step + 1))
        mask[:, width + step] = 1
        logits = model(input_ids=token[:, None], attention_mask=mask[:, :width + step + 1],
                       position_ids=next_position, cache=cache, use_cache=True).logits[:, -1]
        next_position = next_position + 1
    if stats is not None:
        stats.decode_s += time.perf_counter() - start
        stats.generated_tokens += sum(map(len, outputs))
        stats.batch_rows.append([(len(p), len(o)) for p, o in zip(prompts, outputs, strict=True)])
    return [(tokens, not (tokens and tokens[-1] in eos)) for tokens in outputs]
