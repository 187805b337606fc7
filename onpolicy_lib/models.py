"""Loading the teacher and its tokenizer from any of the accepted ``model_name`` forms.

``model_name`` may be the packaged alias (SmolLM2-135M-Instruct from the
offline cache), a hub id (``Qwen/Qwen3-4B-Instruct-2507``), a local HF model
directory, or a ``.gguf`` file (dequantized on load).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def teacher_precision(model_name: str) -> dict[str, Any]:
    """What the teacher's weights really are, whatever dtype they compute in.

    A GGUF teacher (the packaged one included) is quantized at the source: dequantized to fp32 it
    still takes only the values of its quantized blocks, so it is described by its GGUF tensor
    types and bits per weight. A HF checkpoint is at its stored dtype (its native precision).
    ``summary`` is the one line used wherever the teacher is named.
    """
    if model_name == assets.PACKAGED_MODEL:
        path = assets.packaged_model_dir(assets.require_assets()) / assets.PRECISION_FILE
        info = json.loads(path.read_text())
    elif model_name.endswith(".gguf"):
        info = {**assets.gguf_precision(Path(model_name).expanduser()), "stored_as": "dequantized on load"}
    else:
        from transformers import AutoConfig

        source, kwargs = resolve_model_source(model_name)
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=True, **kwargs)
            dtype = str(getattr(config, "dtype", None) or "unknown")
        except OSError:  # a hub id not cached here: known once the model loads where it runs
            dtype = "unknown"
        info = {"format": "checkpoint", "dtype": dtype.replace("torch.", "")}
    if info["format"] == "GGUF":
        kinds = sorted(info["parameters_by_type"].items(), key=lambda kv: -kv[1])
        shares = ", ".join(f"{kind} {100 * n / info['parameters']:.0f}%" for kind, n in kinds)
        info["summary"] = f"GGUF {shares}; {info['bits_per_weight']:g} bits/weight, {info['stored_as']}"
        info["label"] = f"{kinds[0][0]} GGUF"
    else:
        info["summary"] = f"{info['dtype']} checkpoint (native precision)"
        info["label"] = info["dtype"]
    return info


def load_skeleton(model_name: str) -> PreTrainedModel:
    """The architecture without weights (meta device): layer shapes for up-front checks, in milliseconds."""
    from transformers import AutoConfig

    source, kwargs = resolve_model_source(model_name)
    config = AutoConfig.from_pretrained(source, **kwargs)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
