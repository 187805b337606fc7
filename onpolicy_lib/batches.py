"""Distillation batches: one layout for dataset, teacher-sampled and student-sampled completions.

``input_ids = [pad.. prompt | completion ..pad]``: the prompt block is left-padded (what
``generate`` consumes and returns), the completion block right-padded, so off- and on-policy
batches share one layout, one forward (:func:`completion_forward`) and one loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    # Left-padded prompts: positions must count real tokens only, exactly as
    # ``generate`` does, so rollouts and the training forward see the same inputs.
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


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


def eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """Every end-of-sequence id: the tokenizer's and the generation config's (Qwen3 has two)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    return sorted({tokenizer.eos_token_id, *ids} - {None})


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
    return completion_batch(inputs, sequences, pad_token_id, eos_token_ids)


def completion_batch(inputs: dict[str, torch.Tensor], sequences: torch.Tensor, pad_token_id: int,
                     eos_token_ids: list[int]) -> dict[str, torch.Tensor]:
    """The batch rebuilt around ``sequences`` (``generate``'s: the prompt columns, then the completions)."""
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
