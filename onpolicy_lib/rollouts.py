"""The forms a student's rollout can take, the contexts that apply them, which settings are valid, and ``auto``.

Three options say how the student samples its rollouts (the training forward is never affected):

* ``rollout_dtype``: ``float32`` (exact) or ``bfloat16`` (opt-in: its weights cast once per rollout,
  :func:`cast_for_rollout`; the same policy within bf16 rounding);
* ``rollout_matmul``: ``linear`` (``F.linear``, exact), ``weight_major`` (a decode step's products as
  ``W @ x^T``, :func:`weight_major_rollout`) or ``packed`` (each weight reordered once per rollout into
  oneDNN's blocked layout, :func:`packed_rollout`): other CPU kernels, the same policy within float rounding;
* ``rollout_compile``: a compiled, fixed-shape decode step on a copy of the student
  (:class:`~onpolicy_lib.compiled_rollouts.CompiledSampler`; within float rounding).

Each takes ``auto`` too, the default: :func:`resolve` measures the fp32 forms (:data:`FP32_FORMS`) on this
machine at the run's rollout batch and length, once per CPU type, library versions and model shape
(cached on disk), and picks the fastest one whose next-token logits match the exact form's within fp32
rounding; a form is never picked unless it beats the exact default over the run's rollouts (a compiled
form's compile time included). bf16 is never picked by ``auto``: it is another policy. An explicit value
forces its form. The fp32 forms sample the same policy, so a run's identity treats ``auto`` as equal to
any of them (:func:`same_setting`): a resumed run keeps the form it recorded.

This module imports no torch at import time: :mod:`onpolicy_lib.config` validates with its rules.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

AUTO = "auto"
DTYPES = (AUTO, "float32", "bfloat16")
MATMULS = (AUTO, "linear", "weight_major", "packed")
COMPILES = (AUTO, False, True)
OPTIONS = ("rollout_dtype", "rollout_matmul", "rollout_compile")
# The exact form's settings: what a run recorded without these options (written before they existed) ran with.
EXACT_SETTINGS: dict[str, Any] = {"rollout_dtype": "float32", "rollout_matmul": "linear", "rollout_compile": False}
# Largest |logit| difference from the exact form's next-token logits that is still fp32 rounding: another
# summation order over a few hundred products per logit moves them by about 1e-5 (a handful of ulps of
# logits of magnitude 10-30); a wrong kernel or stale weight moves them by orders of magnitude more.
FP32_LOGIT_TOLERANCE = 1e-3
# A compiled form is a candidate of ``auto`` only for runs with at least this many rollout decode steps
# (on-policy share x optimizer steps x accumulation x new tokens): compiling takes tens of seconds to
# minutes on a CPU, and a compiled step saves at most a few tens of milliseconds, so shorter runs
# cannot earn the compile back (measuring it would itself cost more than the run could save).
COMPILE_MIN_DECODE_STEPS = 4000
SPEED_CACHE_ENV = "ONPOLICY_QUANT_SPEED"  # where auto's measurements are kept, if not the asset cache's speed/


class RolloutOptionError(ValueError):
    """A rollout option with a value it does not accept, or a combination that cannot run."""


@dataclass(frozen=True)
class RolloutForm:
    """One form of the student's rollouts: its weights' dtype, its decode products, compiled or not."""

    dtype: str = "float32"
    matmul: str = "linear"
    compiled: bool = False

    @property
    def key(self) -> str:
        """A short name: ``fp32``, ``fp32_wm``, ``fp32_compiled``, ``bf16_wm_compiled``, ..."""
        return ({"float32": "fp32", "bfloat16": "bf16"}[self.dtype] + _MATMUL_KEYS[self.matmul]
                + ("_compiled" if self.compiled else ""))

    @property
    def label(self) -> str:
        parts = [f"{self.dtype} weights"] + ([_MATMUL_LABELS[self.matmul]] if self.matmul != "linear" else []) + \
            (["compiled"] if self.compiled else [])
        return ", ".join(parts)

    @property
    def exact(self) -> bool:
        return self == EXACT

    @property
    def linear_forward(self) -> Callable[[nn.Linear], Callable[[torch.Tensor], torch.Tensor]] | None:
        """What a compiled copy's Linear layers compute with (``CompiledSampler``'s ``linear_forward``)."""
        return weight_major_forward if self.matmul == "weight_major" else None

    def settings(self) -> dict[str, Any]:
        """The form as TrainConfig's options name it."""
        return {"rollout_dtype": self.dtype, "rollout_matmul": self.matmul, "rollout_compile": self.compiled}

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> RolloutForm:
        """The form of explicit settings (``auto`` read as the exact form's value)."""
        values = {k: EXACT_SETTINGS[k] if settings.get(k, AUTO) == AUTO else settings[k] for k in OPTIONS}
        return cls(values["rollout_dtype"], values["rollout_matmul"], bool(values["rollout_compile"]))


_MATMUL_KEYS = {"linear": "", "weight_major": "_wm", "packed": "_pk"}
_MATMUL_LABELS = {"linear": "linear", "weight_major": "weight-major", "packed": "packed (oneDNN)"}
EXACT = RolloutForm()
# What ``auto`` chooses among (exact first): every fp32 form (packed ones where oneDNN is built in,
# :func:`packed_available`; a compiled copy has no packed form).
FP32_FORMS: tuple[RolloutForm, ...] = (
    EXACT, RolloutForm(matmul="weight_major"), RolloutForm(matmul="packed"), RolloutForm(compiled=True),
    RolloutForm(matmul="weight_major", compiled=True))


def packed_available() -> bool:
    """Whether this torch build has oneDNN's packed linear (x86 and most CPU builds; checked, not assumed)."""
    import torch

    return bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


# ---------------------------------------------------------------------------- validity
def check_options(rollout_dtype: Any, rollout_matmul: Any, rollout_compile: Any, *, fsdp: bool = False,
                  lora_r: int | None = None) -> None:
    """Raise :class:`RolloutOptionError` naming the option, if a value or combination cannot run."""
    for name, value, choices in (("rollout_dtype", rollout_dtype, DTYPES), ("rollout_matmul", rollout_matmul, MATMULS)):
        if value not in choices:
            raise RolloutOptionError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    if rollout_compile != AUTO and not isinstance(rollout_compile, bool):
        raise RolloutOptionError(f"rollout_compile must be True, False or 'auto', got {rollout_compile!r}")
    if fsdp and rollout_dtype not in (AUTO, "float32"):
        raise RolloutOptionError(f"rollout_dtype must be float32 with fsdp (sharded weights are gathered "
                                 f"layer by layer inside the forward, so there is no whole weight to cast), got "
                                 f"{rollout_dtype!r}")
    if fsdp and rollout_matmul not in (AUTO, "linear"):
        raise RolloutOptionError(f"rollout_matmul must be linear with fsdp (the weight-major and packed products "
                                 f"are untested on gathered shards), got {rollout_matmul!r}")
    if rollout_matmul == "packed" and rollout_compile is True:
        raise RolloutOptionError("rollout_matmul packed cannot be compiled (its weights are reordered once per "
                                 "rollout, outside the compiled copy): set rollout_compile False or "
                                 f"rollout_matmul linear or weight_major, got rollout_compile={rollout_compile!r}")
    if rollout_compile is True and (fsdp or lora_r is not None):
        raise RolloutOptionError("rollout_compile needs a plain quantization-aware student (it samples from a copy of "
                                 "the teacher's architecture holding the student's weights): set fsdp False and "
                                 f"lora_r None, got fsdp={fsdp}, lora_r={lora_r}")


def candidates(settings: dict[str, Any], *, fsdp: bool = False, lora: bool = False,
               decode_steps: int | None = None) -> list[RolloutForm]:
    """The forms ``settings`` allow, exact first: one form when every option is explicit; under ``auto``
    the fp32 forms that agree with the explicit options and can run (sharded: the exact form alone; LoRA:
    nothing compiled; compiled only for runs of at least :data:`COMPILE_MIN_DECODE_STEPS` decode steps)."""
    if not any(settings.get(k, AUTO) == AUTO for k in OPTIONS):
        return [RolloutForm.from_settings(settings)]
    if settings.get("rollout_dtype", AUTO) == "bfloat16":  # bf16 forced: auto only picks among its forms
        pool = [RolloutForm("bfloat16", f.matmul, f.compiled) for f in FP32_FORMS]
    else:
        pool = list(FP32_FORMS)
    found = []
    for form in pool:
        explicit = {k: v for k, v in settings.items() if k in OPTIONS and v != AUTO}
        if any(form.settings()[k] != v for k, v in explicit.items()):
            continue
        if fsdp and (form.matmul != "linear" or form.compiled):
            continue
        if form.matmul == "packed" and (form.dtype != "float32" or not packed_available()):
            continue
        if form.compiled and (lora or fsdp or (settings.get("rollout_compile", AUTO) == AUTO and
                                              (decode_steps or 0) < COMPILE_MIN_DECODE_STEPS)):
            continue
        found.append(form)
    return found or [RolloutForm.from_settings(settings)]


def same_setting(name: str, recorded: Any, requested: Any) -> bool:
    """Whether a run recorded with ``recorded`` for rollout option ``name`` is the run ``requested`` asks for:
    ``auto`` stands for any fp32 form (they sample the same policy within rounding), so it matches
    ``auto`` or an fp32 form's value in either direction; otherwise the values must be equal."""
    if recorded == requested:
        return True
    if AUTO not in (recorded, requested):
        return False
    other = requested if recorded == AUTO else recorded
    return name != "rollout_dtype" or other == "float32"


# ---------------------------------------------------------------------------- the contexts
@contextlib.contextmanager
def cast_for_rollout(model: nn.Module, dtype: torch.dtype, linear_only: bool = False) -> Iterator[nn.Module]:
    """Every parameter of ``model`` as a ``dtype`` copy for the context's duration (rollouts only).

    A fake-quantized layer gets its fake-quantized weight cast (its quantizer is off meanwhile),
    so the rollout samples the quantized student, computed in ``dtype``. Casting once per rollout
    rather than under autocast (which would recast every weight at every generated token) is what
    makes it faster than float32. Tied parameters stay tied. On exit (also on exception) the
    original Parameter objects are put back: optimizer state and values are untouched.

    ``linear_only``: only the weights of ``nn.Linear`` layers (fake-quantized ones included), for rollouts
    under autocast to ``dtype``: autocast casts a linear's weight to ``dtype`` at every call anyway, so the
    products, and the sampled tokens, are bit-identical, without a cast of every weight at every token.
    Embeddings, norms and biases keep their dtype and autocast's handling (a weight tied to an embedding
    is cast for its linear only).
    """
    import torch
    from torch import nn

    from onpolicy_lib.quantization import active_fake_quantized

    saved: list[tuple[nn.Module, str, nn.Parameter]] = []
    quantizers: list[nn.Module] = []
    casts: dict[int, nn.Parameter] = {}
    try:
        with torch.no_grad():
            for mod, quantizer in list(active_fake_quantized(model)):
                weight = mod.weight
                # quantizer(weight), not of a detached copy: inside an on-policy step it returns the
                # step's shared quantized weight instead of recomputing it.
                fq = nn.Parameter(quantizer(weight).to(dtype), requires_grad=False)
                saved.append((mod, "weight", weight))
                quantizers.append(quantizer)
                quantizer.enabled = False
                mod._parameters["weight"] = fq
            for mod in model.modules():
                if linear_only and not isinstance(mod, nn.Linear):
                    continue
                for name, param in list(mod._parameters.items()):
                    if param is None or param.dtype == dtype:  # the quantized weights cast above included
                        continue
                    if linear_only and name != "weight":
                        continue
                    if id(param) not in casts:
                        casts[id(param)] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
                    saved.append((mod, name, param))
                    mod._parameters[name] = casts[id(param)]
        yield model
    finally:
        for mod, name, param in reversed(saved):
            mod._parameters[name] = param
        for quantizer in quantizers:
            quantizer.enabled = True


def weight_major_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, computed as ``(weight @ x^T)^T`` for a decode step's input.

    A decode step multiplies a few rows (one position per sequence) by every weight matrix, so
    it is bound by reading the weights. Some CPU BLAS builds read a row-major ``weight`` as the left
    operand at close to memory bandwidth, but several times slower as the transposed right operand
    that ``F.linear`` passes (others the reverse: ``auto`` measures which). Same products, another
    summation order: equal within float rounding. Other inputs (a prefill: many positions per
    sequence) go through ``F.linear`` unchanged.
    """
    import torch

    if x.dim() != 3 or x.shape[1] != 1:
        return torch.nn.functional.linear(x, weight, bias)
    # Contiguous output: the next layer's input then takes the same fast path.
    out = torch.mm(weight, x.reshape(x.shape[0], x.shape[2]).t()).t().contiguous()
    if bias is not None:
        out = out + bias
    return out.unsqueeze(1)


def weight_major_forward(mod: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """``mod``'s forward (plain or fake-quantized Linear) with :func:`weight_major_linear` as its product."""
    quantizer = getattr(mod, "weight_fake_quantizer", None)
    activation_quantizer = getattr(mod, "activation_fake_quantizer", None)

    def forward(x: torch.Tensor) -> torch.Tensor:
        # FakeQuantizedLinear.forward's steps, with the weight-major product in place of F.linear.
        if activation_quantizer is not None:
            x = activation_quantizer(x)
        weight = quantizer(mod.weight) if quantizer is not None else mod.weight
        return weight_major_linear(x, weight, mod.bias)

    return forward


@contextlib.contextmanager
def weight_major_rollout(model: nn.Module) -> Iterator[nn.Module]:
    """Every plain or fake-quantized Linear of ``model`` computes decode steps with
    :func:`weight_major_linear` for the context's duration (rollouts only).

    The layers compute the same function of the same weights (whatever form the weights take
    inside the context: materialised, cast or shared), only the matrix product's kernel
    changes. A layer that already has its own ``forward`` (a hook library's wrapper) is left
    alone. On exit (also on exception) each layer's class ``forward`` is back.
    """
    with _linear_forwards(model, weight_major_forward):
        yield model


@contextlib.contextmanager
def _linear_forwards(model: nn.Module, make: Callable[[nn.Module], Callable | None]) -> Iterator[nn.Module]:
    """Each plain or fake-quantized Linear of ``model`` without a ``forward`` of its own computes with
    ``make(layer)`` (None: left alone) for the context's duration; on exit (also on exception) each
    patched layer's class ``forward`` is back."""
    from torch import nn
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    patched: list[nn.Module] = []
    try:
        for mod in model.modules():
            if type(mod) in (nn.Linear, FakeQuantizedLinear) and "forward" not in mod.__dict__:
                forward = make(mod)
                if forward is not None:
                    mod.forward = forward
                    patched.append(mod)
        yield model
    finally:
        for mod in patched:
            del mod.forward


def packed_forward(mod: nn.Linear, weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``mod``'s forward with ``weight`` (its effective weight: fake-quantized where it is) reordered once into
    oneDNN's blocked layout for a decode step's products; other inputs (a prefill) use ``F.linear`` on ``weight``.

    A decode step multiplies a few rows by every weight: oneDNN's inner product on a pre-blocked weight reads it
    at close to memory bandwidth on CPUs where the BLAS ``F.linear`` calls (and the weight-major product) do
    not. Same products, another summation order: equal within float rounding.
    """
    import torch

    packed: dict[int, torch.Tensor] = {}  # by rows: the layout is chosen for the batch (packed at its first step)
    activation_quantizer = getattr(mod, "activation_fake_quantizer", None)
    bias = mod.bias

    def forward(x: torch.Tensor) -> torch.Tensor:
        if activation_quantizer is not None:
            x = activation_quantizer(x)
        if x.dim() != 3 or x.shape[1] != 1 or x.dtype != weight.dtype or x.device.type != "cpu":
            return torch.nn.functional.linear(x, weight, bias)
        n = x.shape[0]
        if n not in packed:
            packed.clear()  # one batch size at a time: a rollout's rows stay the same until it ends
            packed[n] = torch.ops.mkldnn._reorder_linear_weight(weight, n)
        rows = x.reshape(n, x.shape[2]).contiguous()
        return torch.ops.mkldnn._linear_pointwise(rows, packed[n], bias, "none", [], "").unsqueeze(1)

    return forward


@contextlib.contextmanager
def packed_rollout(model: nn.Module) -> Iterator[nn.Module]:
    """Every plain or fake-quantized Linear of ``model`` computes decode steps with its weight packed once
    (:func:`packed_forward`) for the context's duration (rollouts only).

    Each layer's effective weight is taken on entry (the fake-quantized one, or inside an on-policy step the
    step's shared quantized weight) and must not change inside the context: a rollout samples one policy. A
    layer that already has its own ``forward``, or whose weight is not a plain float tensor on the CPU (a
    deployed student's quantized weight), is left alone. On exit (also on exception) each layer's class
    ``forward`` is back and the packed copies are freed.
    """
    import torch

    def make(mod: nn.Module) -> Callable | None:
        quantizer = getattr(mod, "weight_fake_quantizer", None)
        active = quantizer is not None and getattr(quantizer, "enabled", True)
        with torch.no_grad():
            weight = (quantizer(mod.weight) if active else mod.weight).detach()
        plain = type(weight) is torch.Tensor and weight.is_floating_point()
        # A quantized tensor subclass (a deployed student) keeps its own kernel.
        return packed_forward(mod, weight) if plain and weight.device.type == "cpu" else None

    with _linear_forwards(model, make):
        yield model


@contextlib.contextmanager
def eager_form(model: nn.Module, form: RolloutForm, materialise: bool = False,
               autocast_dtype: torch.dtype | None = None) -> Iterator[nn.Module]:
    """``model`` (the student) computing its decode steps in ``form`` (not compiled) for the context's duration;
    ``materialise``: its fake-quantized weights quantized once for the context
    (:func:`~onpolicy_lib.quantization.materialized_fake_quant`; not inside an on-policy step, whose
    weights are already shared). ``autocast_dtype``: the rollout runs under autocast to it (bf16 training),
    so an fp32 form's linear weights are cast to it once (:func:`cast_for_rollout` ``linear_only``; the same
    tokens, bit for bit)."""
    import torch

    from onpolicy_lib.quantization import materialized_fake_quant

    if form.compiled:
        raise ValueError(f"eager_form: {form.label} is compiled; sample it through a CompiledSampler")
    with contextlib.ExitStack() as stack:
        if materialise:
            stack.enter_context(materialized_fake_quant(model))
        if form.dtype != "float32":
            stack.enter_context(cast_for_rollout(model, getattr(torch, form.dtype)))
        elif autocast_dtype is not None and autocast_dtype != torch.float32:
            stack.enter_context(cast_for_rollout(model, autocast_dtype, linear_only=True))
        if form.matmul == "weight_major":
            stack.enter_context(weight_major_rollout(model))
        elif form.matmul == "packed":
            stack.enter_context(packed_rollout(model))
        yield model


# ---------------------------------------------------------------------------- auto: measuring and choosing
def expected_decode_steps(lmbda: float, max_steps: int, accumulation: int, max_new_tokens: int) -> int:
    """Decode steps the student's rollouts take over a run, at most (teacher rollouts, ``seq_kd``, are the
    teacher's own and take no student form)."""
    return int(round(lmbda * max_steps * accumulation)) * max_new_tokens


def run_cost(measured: dict[str, Any], decode_steps: int) -> float:
    """Seconds a form's decode steps cost over a run of ``decode_steps`` (its compile once, included)."""
    return measured.get("compile_s", 0.0) + measured["decode_step_s"] * max(decode_steps, 1)


def choose(measured: dict[str, dict[str, Any]], forms: list[RolloutForm], decode_steps: int,
           tolerance: float = FP32_LOGIT_TOLERANCE) -> tuple[RolloutForm, str]:
    """The form to sample with, and why: the cheapest over the run among ``forms`` whose logits stay within
    ``tolerance`` of the exact form's, and only if it is cheaper than the exact form (``forms[0]`` when
    exact is not among them)."""
    baseline = forms[0]
    if len(forms) == 1:
        return baseline, "the only form the settings allow"
    if baseline.key not in measured:
        raise ValueError(f"auto: no measurement of the baseline form {baseline.label}")
    best, best_cost = baseline, run_cost(measured[baseline.key], decode_steps)
    notes = []
    for form in forms[1:]:
        m = measured.get(form.key)
        if m is None:
            continue
        if not m.get("max_logit_diff", math.inf) <= tolerance:
            notes.append(f"{form.key} outside fp32 tolerance ({m.get('max_logit_diff')})")
            continue
        cost = run_cost(m, decode_steps)
        if cost < best_cost:
            best, best_cost = form, cost
    why = (f"fastest over the run's {decode_steps} decode steps ({best_cost:.1f} s against "
           f"{run_cost(measured[baseline.key], decode_steps):.1f} s for {baseline.key})")
    return best, why + (f"; {'; '.join(notes)}" if notes else "")


def model_shape(model: nn.Module) -> dict[str, Any]:
    """The architecture's sizes that set a decode step's cost."""
    config = getattr(model, "config", None)
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {k: getattr(text, k, None) for k in keys} if text is not None else {}


def cache_key(machine: str, shape: dict[str, Any], rows: int, prompt_width: int, max_new_tokens: int) -> dict[str, Any]:
    """What a measurement holds for: the machine (CPU type, torch version and threads), transformers'
    version, the model's shape and the rollout's batch, prompt width and length."""
    import transformers

    return {"machine": machine, "transformers": transformers.__version__, "model": shape, "rows": rows,
            "prompt_width": prompt_width, "max_new_tokens": max_new_tokens}


def cache_file(key: dict[str, Any], root: Path | None = None) -> Path:
    """Where a measurement with ``key`` is kept: ``<asset cache>/speed/rollout-<hash>.json`` (``root``, or
    ``$ONPOLICY_QUANT_SPEED``, instead of ``<asset cache>/speed``)."""
    import os

    from onpolicy_lib.assets import cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = root or Path(os.environ.get(SPEED_CACHE_ENV) or cache_dir() / "speed")
    return root / f"rollout-{digest}.json"


def _read_cache(path: Path, key: dict[str, Any]) -> dict[str, dict[str, Any]]:
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return stored.get("measured", {}) if stored.get("key") == key else {}


def _write_cache(path: Path, key: dict[str, Any], measured: dict[str, dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "measured": measured}, indent=1))
    tmp.replace(path)  # whole or not at all: a killed measurement leaves the previous file


Measure = Callable[[list[RolloutForm]], dict[str, dict[str, Any]]]


def resolve(settings: dict[str, Any], *, decode_steps: int, key: dict[str, Any] | None, measure: Measure,
            fsdp: bool = False, lora: bool = False, cache_root: Path | None = None) -> dict[str, Any]:
    """Settle ``settings``' ``auto`` options: the record a run keeps (``rollout_*`` concrete values, the form,
    why, what was measured and where the measurement is cached).

    ``measure(forms)`` times each form's decode step (``decode_step_s``, ``compile_s`` for compiled ones) and
    its largest next-token logit difference from the first form's (``max_logit_diff``); it runs only for
    forms the cache under ``key`` lacks. Nothing is measured when every option is explicit, when only one
    form is allowed, or when the run has no student rollouts.
    """
    forms = candidates(settings, fsdp=fsdp, lora=lora, decode_steps=decode_steps)
    auto = [k for k in OPTIONS if settings.get(k, AUTO) == AUTO]
    record: dict[str, Any] = {"auto": auto, "candidates": [f.key for f in forms], "decode_steps": decode_steps}
    if not auto or len(forms) == 1 or decode_steps == 0:
        form = forms[0]
        why = ("every option explicit" if not auto else "no student rollouts in this run" if decode_steps == 0
               else "the only form the settings allow")
        return {**form.settings(), "form": form.key, "why": why, **record}
    path = cache_file(key, cache_root) if key is not None else None
    measured = _read_cache(path, key) if path is not None else {}
    missing = [f for f in forms if f.key not in measured]
    cached = not missing
    if missing:
        # The baseline is measured with the rest: the logit check compares against it in the same process.
        fresh = measure([forms[0]] + [f for f in missing if f != forms[0]])
        measured.update(fresh)
        if path is not None:
            _write_cache(path, key, measured)
    form, why = choose(measured, forms, decode_steps)
    return {**form.settings(), "form": form.key, "why": why, **record,
            "measured": {f.key: measured[f.key] for f in forms if f.key in measured},
            "cache": str(path) if path is not None else None, "cached": cached}


@dataclass
class DecodeProbe:
    """A fixed rollout-shaped workload: ``rows`` prompts of ``prompt_width`` tokens, then forced decode steps
    from the middle of the rollout (``max_new_tokens // 2`` positions in, the run's mean cache depth)."""

    rows: int
    prompt_width: int
    max_new_tokens: int
    vocab_size: int
    steps: int = 6
    warmup: int = 2
    seed: int = 0

    def tokens(self, device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        import torch

        generator = torch.Generator().manual_seed(self.seed)
        width = self.prompt_width + self.max_new_tokens // 2
        prompt = torch.randint(0, self.vocab_size, (self.rows, width), generator=generator)
        forced = torch.randint(0, self.vocab_size, (self.rows, self.warmup + self.steps), generator=generator)
        return prompt.to(device), torch.ones_like(prompt), forced.to(device)


def measure_forms(forms: list[RolloutForm], student: nn.Module, template: nn.Module, probe: DecodeProbe,
                  device: Any = "cpu", backend: Any = "inductor") -> dict[str, dict[str, Any]]:
    """Each form's median decode step on ``probe`` (the student's rollout as it would sample it; compiled
    forms on a :class:`~onpolicy_lib.compiled_rollouts.CompiledSampler` of ``template``, their compile time
    apart), and its largest next-token logit difference from ``forms[0]``'s on the same forced tokens.
    ``backend``: the compiled forms' ``torch.compile`` backend (None: their static-cache loop, eager)."""

    prompt, mask, forced = probe.tokens(device)
    logits: dict[str, torch.Tensor] = {}
    out: dict[str, dict[str, Any]] = {}
    was_training = student.training
    student.eval()  # sampled as deployed, as a rollout samples it
    try:
        for form in forms:
            out[form.key] = _measure_form(form, student, template, probe, prompt, mask, forced, backend, logits)
            out[form.key]["max_logit_diff"] = float((logits[form.key] - logits[forms[0].key]).abs().max())
    finally:
        student.train(was_training)
    return out


def _measure_form(form: RolloutForm, student: nn.Module, template: nn.Module, probe: DecodeProbe,
                  prompt: torch.Tensor, mask: torch.Tensor, forced: torch.Tensor, backend: Any,
                  logits: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One form's figures (:func:`measure_forms`); its next-token logits go into ``logits``."""
    import torch

    out: dict[str, Any] = {}
    if form.compiled:
        from onpolicy_lib.compiled_rollouts import CompiledSampler

        start = time.perf_counter()
        sampler = CompiledSampler(template, getattr(torch, form.dtype), linear_forward=form.linear_forward,
                                  backend=backend)
        sampler.refresh(student)
        seen, seconds = sampler.forced_decode(prompt, mask, forced)
        # The first decode step compiles: the whole call's time beyond its compiled steps is the compile
        # (the shadow copy and the prefill are included: a run pays them too).
        out["compile_s"] = round(max(time.perf_counter() - start - sum(seconds[1:])
                                     - statistics.median(seconds[probe.warmup:]), 0.0), 3)
    else:
        with eager_form(student, form, materialise=True):
            seen, seconds = forced_decode(student, prompt, mask, forced)
    out["decode_step_s"] = statistics.median(seconds[probe.warmup:])
    logits[form.key] = seen.float()
    return out


def forced_decode(model: nn.Module, prompt: torch.Tensor, mask: torch.Tensor,
                  forced: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Prefill ``prompt``, then feed ``forced``'s tokens one decode step at a time through ``model``'s own
    (dynamic) KV cache: the next-token logits of every step ``[steps, rows, vocab]`` and each step's seconds."""
    import torch

    with torch.no_grad():
        out = model(input_ids=prompt, attention_mask=mask, use_cache=True, logits_to_keep=1)
        cache, seen, seconds = out.past_key_values, [], []
        for t in range(forced.shape[1]):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            start = time.perf_counter()
            out = model(input_ids=forced[:, t:t + 1], attention_mask=mask, past_key_values=cache, use_cache=True)
            seen.append(out.logits[:, -1].float())
            seconds.append(time.perf_counter() - start)
            cache = out.past_key_values
    return torch.stack(seen), seconds


def settle(cfg: Any, student: nn.Module, template: nn.Module, prompt_width: int, machine: str, device: Any = "cpu",
           cache_root: Path | None = None, backend: Any = "inductor") -> dict[str, Any]:
    """:func:`resolve` for a run of ``cfg`` (a TrainConfig): its student (fake-quantized) and the template its
    compiled forms copy (the teacher), measured at the run's rollout batch (``per_device_train_batch_size``
    rows of ``prompt_width`` tokens, a typical batch's) and length (``max_new_tokens``); ``machine``: the CPU
    and torch build it runs on (:func:`onpolicy_lib.metrics.machine_description`), part of the cache's key."""

    settings = {k: getattr(cfg, k) for k in OPTIONS}
    if torch_device(device).type != "cpu" and AUTO in settings.values():
        # The fp32 forms differ by CPU kernels; on an accelerator auto keeps the exact form (explicit values force).
        form = RolloutForm.from_settings(settings)
        return {**form.settings(), "form": form.key, "why": f"auto measures on CPUs only: exact on {device}",
                "auto": [k for k in OPTIONS if settings[k] == AUTO], "candidates": [form.key]}
    steps = expected_decode_steps(cfg.lmbda, cfg.max_steps, cfg.gradient_accumulation_steps, cfg.max_new_tokens)
    shape = model_shape(template)
    width = 32 * max(1, round(prompt_width / 32))  # nearby widths share a measurement
    probe = DecodeProbe(cfg.per_device_train_batch_size, width, cfg.max_new_tokens, shape.get("vocab_size") or 2)
    key = cache_key(machine, shape, probe.rows, width, cfg.max_new_tokens)
    return resolve(settings, decode_steps=steps, key=key, fsdp=cfg.fsdp, lora=cfg.lora_r is not None,
                   cache_root=cache_root,
                   measure=lambda forms: measure_forms(forms, student, template, probe, device, backend=backend))


def torch_device(device: Any) -> torch.device:
    import torch

    return torch.device(device)
