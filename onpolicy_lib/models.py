"""Loading the teacher and its tokenizer from any of the accepted ``model_name`` forms.

``model_name`` may be the packaged alias (SmolLM2-135M-Instruct from the
offline cache), a hub id (``Qwen/Qwen3-4B-Instruct-2507``), a local HF model
directory, or a ``.gguf`` file (dequantized on load).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from onpolicy_lib import assets


def resolve_model_source(model_name: str) -> tuple[str, dict]:
    """Where ``from_pretrained`` should look, and the extra kwargs it needs."""
    if model_name == assets.PACKAGED_MODEL:
        return str(assets.packaged_model_dir(assets.require_assets())), {}
    path = Path(model_name).expanduser()
    if model_name.endswith(".gguf"):
        return str(path.parent), {"gguf_file": path.name}
    return (str(path), {}) if path.is_dir() else (model_name, {})


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    # fp32 on CPU (bf16 matmuls are slow there and the packaged model is tiny);
    # bf16 on GPUs as in the original study.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_tokenizer(model_name: str) -> PreTrainedTokenizerBase:
    """Tokenizer with its chat template, left padding (for batched generation) and a pad token."""
    source, kwargs = resolve_model_source(model_name)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer.chat_template is None:
        raise ValueError(f"model_name {model_name!r}: tokenizer has no chat template; use an instruct model")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_name: str, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The full-precision model (teacher, or the starting point of a student)."""
    device = torch.device(device)
    source, kwargs = resolve_model_source(model_name)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or default_dtype(device), **kwargs)
    if kwargs.get("gguf_file"):
        model = assets.drop_gguf_quantizer(model)
    return model.to(device)


def load_skeleton(model_name: str) -> PreTrainedModel:
    """The architecture without weights (meta device): layer shapes for up-front checks, in milliseconds."""
    from transformers import AutoConfig

    source, kwargs = resolve_model_source(model_name)
    config = AutoConfig.from_pretrained(source, **kwargs)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
