"""Sliding-window perplexity on held-out text.

Offline the text is LAMBADA's book passages from the packaged task documents
(not part of the training mixture); online it can be wikitext-2 (raw, test
split), the usual reference. The window recipe is the standard one
(transformers' perplexity guide): windows of ``max_length`` tokens moved by
``stride``, each token scored once, with up to ``max_length - stride`` tokens
of context it does not pay for.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from onpolicy_lib.assets import require_assets, task_docs_dir
from onpolicy_lib.divergence import token_nll

TEXT_SOURCES = ("lambada-offline", "wikitext-2")


def load_text(source: str = "lambada-offline", documents: int = 200, root: Path | None = None) -> str:
    """The evaluation text: ``documents`` passages joined by blank lines."""
    if source == "lambada-offline":
        path = task_docs_dir(require_assets(root)) / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
        passages = []
        with gzip.open(path, "rt") as f:
            for line in f:
                doc = json.loads(line)["doc"]
                passages.append(f"{doc['query']} {doc['answers_text'][0]}")
                if len(passages) == documents:
                    break
        return "\n\n".join(passages)
    if source == "wikitext-2":
        from datasets import load_dataset

        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
        return "\n\n".join(rows)
    raise ValueError(f"perplexity text source must be one of {', '.join(TEXT_SOURCES)}; got {source!r}")


def _leading_bos(tokenizer) -> int | None:
    """The BOS id if the tokenizer puts one before every text by default, else None."""
    bos = tokenizer.bos_token_id
    first = tokenizer("a", add_special_tokens=True)["input_ids"][:1]
    return bos if bos is not None and first == [bos] else None


@torch.no_grad()
def sliding_window_perplexity(model: torch.nn.Module, tokenizer, text: str, max_length: int = 512,
                              stride: int = 256, max_tokens: int | None = None) -> dict[str, Any]:
    """Perplexity of ``text`` (truncated to ``max_tokens`` tokens) under ``model``."""
    if not 0 < stride <= max_length:
        raise ValueError(f"need 0 < stride <= max_length, got stride={stride}, max_length={max_length}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    # A model whose tokenizer starts every text with BOS (Gemma) is out of distribution without
    # it, so each window is read after BOS, as lm-eval reads its requests; BOS itself is never scored.
    bos = _leading_bos(tokenizer)
    device = next(model.parameters()).device
    model.eval()
    nll_sum, scored, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        target_len = end - previous_end  # tokens not scored by an earlier window
        window = ids[begin:end].unsqueeze(0).to(device)
        inputs = window if bos is None else F.pad(window, (1, 0), value=bos)
        # The first token of the text has no context and is never scored; tokens an earlier window
        # scored are context only, so only the last ``take`` positions' logits are computed.
        take = min(target_len, window.shape[1] - 1)
        logits = model(input_ids=inputs, use_cache=False, logits_to_keep=take + 1).logits[0, :-1]
        nll = token_nll(logits, window[0, -take:])
        nll_sum += float(nll.sum())
        scored += take
        previous_end = end
        if end == len(ids):
            break
    mean = nll_sum / max(scored, 1)
    return {"perplexity": math.exp(mean), "nll_per_token": mean, "tokens_scored": scored,
            "max_length": max_length, "stride": stride}
