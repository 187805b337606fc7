"""Weight-only quantization of the student with torchao (QAT, PTQ and fast rollouts).

The student shares its teacher's weights; only its Linear layers are quantized:

* :func:`prepare_qat` swaps them for torchao ``FakeQuantizedLinear`` (latent fp32
  weights, quantize-dequantize in the forward, straight-through gradients);
* :func:`convert_qat` turns the trained student into real quantized weights;
* :func:`quantize_ptq` is the post-training-quantized baseline (no training);
* :func:`materialized_fake_quant` makes rollouts from a fake-quantized student as
  fast as from a plain model, with bit-identical outputs;
* :func:`fake_quantized_once` quantizes each weight once for a whole on-policy step,
  shared by its rollout and its training forward (bit-identical samples and gradients);
* the other forms a rollout can take (bf16 weights, weight-major products, a compiled decode
  step) live in :mod:`onpolicy_lib.rollouts`.

On CPU every type goes through ``IntxWeightOnlyConfig`` with a *symmetric* mapping:
torchao only supports symmetric weights for QAT with that config, and with it the
converted model's logits equal the fake-quantized model's bit for bit. On CUDA,
``int4`` uses ``Int4WeightOnlyConfig`` instead: asymmetric min-max groups, the original GPU
study's grid, packed ``tile_packed_to_4d`` for torch's own int4 kernels (tinygemm), which every
CUDA build of torch ships (the original's default plain packing needs the mslk kernels, see
:data:`CUDA_INT4_PACKING`). torchao's QAT derives no fake quantizer for this packing, so
:class:`TinygemmInt4FakeQuantizer` computes the packing's own quantization (same primitives, same
bf16 arithmetic); the kernel reads those weights back within one bf16 rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization import (
    Int4WeightOnlyConfig,
    IntxWeightOnlyConfig,
    MappingType,
    PerGroup,
    quantize_,
)
from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
from torchao.quantization.qat.linear import FakeQuantizedLinear
from torchao.quantization.quant_primitives import (
    _choose_qparams_affine_tinygemm,
    _dequantize_affine_tinygemm_no_dtype_check,
    _quantize_affine_tinygemm_no_dtype_cast,
)
from torchao.quantization.quantize_.workflows import Int4PackingFormat
from torchao.utils import TorchAOBaseTensor

from onpolicy_lib.schemes import QUANT_TYPES

# Group sizes tried by default_group_size, best first (128 is what the original study used).
PREFERRED_GROUP_SIZES = (128, 64, 32)
_MAX_LISTED_GROUP_SIZES = 10
_DTYPES = {"int4": torch.int4, "int8": torch.int8, "int3": torch.int3, "int2": torch.int2}


class QuantizationError(ValueError):
    """A quantization setting that cannot work for this model."""


def check_quant_type(quant_type: str) -> None:
    """Raise QuantizationError unless ``quant_type`` is one of :data:`QUANT_TYPES`."""
    if quant_type not in QUANT_TYPES:
        allowed = ", ".join(QUANT_TYPES)
        raise QuantizationError(f"unknown quant_type {quant_type!r}; expected one of {allowed}")


def is_quantizable(module: nn.Module, fqn: str, quantize_head: bool = False) -> bool:
    """Whether the layer ``fqn`` is one the student quantizes (a ``quantize_`` filter_fn).

    Every nn.Linear except LoRA adapters and, unless ``quantize_head``, the output head. peft's
    wrapped base layers (``...q_proj.base_layer``) are nn.Linear, so they are included.
    """
    if not isinstance(module, nn.Linear):
        return False
    # Same exclusion as torchao's default filter (attention out_proj of nn.MultiheadAttention).
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return False
    parts = fqn.split(".")
    # The head is tied to the embedding matrix in many models (SmolLM2 included), and
    # it is commonly kept in high precision: it is a small share of the weights and
    # quantizing it hurts the output distribution the student is distilled on.
    if "lm_head" in parts and not quantize_head:
        return False
    # LoRA adapters (lora_A/lora_B/...) are the trainable high-precision correction.
    return not any(part.startswith("lora_") for part in parts)


def _quantizable_layers(model: nn.Module, quantize_head: bool = False) -> list[tuple[str, nn.Linear]]:
    return [(name, mod) for name, mod in model.named_modules() if is_quantizable(mod, name, quantize_head)]


def _filter(quantize_head: bool) -> Callable[[nn.Module, str], bool]:
    return functools.partial(is_quantizable, quantize_head=quantize_head)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def valid_group_sizes(model: nn.Module, quantize_head: bool = False) -> list[int]:
    """Group sizes that divide every quantizable layer's in_features, largest first."""
    layers = _quantizable_layers(model, quantize_head)
    if not layers:
        return []
    gcd = math.gcd(*(mod.in_features for _, mod in layers))
    return sorted(_divisors(gcd), reverse=True)


def _format_sizes(sizes: list[int]) -> str:
    shown = ", ".join(str(s) for s in sizes[:_MAX_LISTED_GROUP_SIZES])
    return shown + (", ..." if len(sizes) > _MAX_LISTED_GROUP_SIZES else "")


def check_group_size(model: nn.Module, group_size: int, quantize_head: bool = False) -> None:
    """Raise QuantizationError unless ``group_size`` divides every quantizable in_features.

    Checked up front because torchao fails deep inside ``quantize_`` otherwise, and
    the message names the first offending layer and the valid sizes.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise QuantizationError(
            f"group_size must be a positive integer, got {group_size!r}; "
            f"valid group sizes: {_format_sizes(valid_group_sizes(model, quantize_head))}"
        )
    for name, mod in _quantizable_layers(model, quantize_head):
        if mod.in_features % group_size:
            valid = _format_sizes(valid_group_sizes(model, quantize_head))
            raise QuantizationError(
                f"group_size {group_size} does not divide in_features={mod.in_features} of layer {name!r}; "
                f"valid group sizes (dividing every quantized layer): {valid}"
            )


def default_group_size(model: nn.Module, quantize_head: bool = False) -> int:
    """128 if it divides every quantizable in_features, else 64, else 32 (64 for SmolLM2-135M)."""
    valid = valid_group_sizes(model, quantize_head)
    if not valid:
        raise QuantizationError("the model has no quantizable Linear layers")
    for size in PREFERRED_GROUP_SIZES:
        if size in valid:
            return size
    raise QuantizationError(
        f"none of the group sizes {PREFERRED_GROUP_SIZES} divides every quantizable in_features; "
        f"valid group sizes: {_format_sizes(valid)}"
    )


def resolve_group_size(model: nn.Module, group_size: int | None, quantize_head: bool = False) -> int:
    """``group_size`` (None: the model's default), checked against the model's layers."""
    group_size = group_size or default_group_size(model, quantize_head)
    check_group_size(model, group_size, quantize_head)
    return group_size


def base_config(quant_type: str, group_size: int, device: str | torch.device = "cpu") -> AOBaseConfig:
    """The torchao post-training config behind ``quant_type`` (QAT derives its fake quantizer from it)."""
    check_quant_type(quant_type)
    if quant_type == "int4" and torch.device(device).type == "cuda":
        return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format=Int4PackingFormat(CUDA_INT4_PACKING))
    # SYMMETRIC is required: torchao's QAT accepts nothing else for IntxWeightOnlyConfig,
    # and it is what makes convert bit-exact with the fake-quantized forward.
    return IntxWeightOnlyConfig(
        weight_dtype=_DTYPES[quant_type],
        granularity=PerGroup(group_size),
        mapping_type=MappingType.SYMMETRIC,
    )


# CUDA int4 packs for torch's own int4 kernels (tinygemm), which every CUDA build of torch ships.
# torchao's default plain packing runs on the mslk kernels instead: PyPI's ``mslk`` is an empty
# placeholder, and ``mslk-cuda`` 1.1.0 imports with torch 2.11+cu130 but its int4 kernel stopped
# an H100 with an illegal instruction (see the README's GPU section).
CUDA_INT4_PACKING = "tile_packed_to_4d"


# Group sizes torch's tinygemm int4 kernel accepts.
TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)


def _is_tinygemm(config: AOBaseConfig) -> bool:
    return (isinstance(config, Int4WeightOnlyConfig)
            and config.int4_packing_format == Int4PackingFormat.TILE_PACKED_TO_4D)


def check_kernels(quant_type: str, device: str | torch.device, group_size: int | None = None) -> None:
    """Refuse, before any training, a scheme whose conversion cannot run on ``device``.

    CUDA ``int4`` converts to torch's tinygemm kernels: they need compute capability 8.0 (Ampere) or
    newer and a group size of 32, 64, 128 or 256.
    """
    if quant_type != "int4" or torch.device(device).type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    if major < 8:
        raise QuantizationError(f"quant_type 'int4' on this GPU (compute capability {major}.{minor}) needs "
                                "capability 8.0 or newer (torch's int4 kernels); use int8 or train on CPU")
    if group_size is not None and group_size not in TINYGEMM_GROUP_SIZES:
        raise QuantizationError(f"group_size {group_size} with quant_type 'int4' on CUDA (torch's int4 kernels) must "
                                f"be one of {', '.join(map(str, TINYGEMM_GROUP_SIZES))}")


@dataclasses.dataclass(frozen=True)
class TinygemmInt4FakeQuantizeConfig:
    """What :class:`TinygemmInt4FakeQuantizer` computes (compared by value before conversion)."""

    group_size: int
    dtype: torch.dtype = torch.uint4


class TinygemmInt4FakeQuantizer(nn.Module):
    """Fake quantization onto the grid of torchao's ``tile_packed_to_4d`` int4 packing.

    The weight is cast to bf16 (the packing's only dtype) and quantized with the very primitives
    that packing's ``from_hp`` calls (asymmetric min-max per group of ``group_size``, scale and
    zero point in bf16, zero point in the float domain): converting gives the same dequantized
    values (the kernel dequantizes in higher precision: within one bf16 rounding). Rounding is
    straight-through (torchao's ``_Round``); gradients also reach the latent weights through the
    group's min and max, as in torchao's own int4 fake quantizer.
    """

    def __init__(self, group_size: int) -> None:
        super().__init__()
        self.config = TinygemmInt4FakeQuantizeConfig(group_size)
        self.enabled = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        w16 = w.to(torch.bfloat16)
        block = [1] * (w16.dim() - 1) + [self.config.group_size]
        scale, zero = _choose_qparams_affine_tinygemm(w16, MappingType.ASYMMETRIC, tuple(block), torch.int32, 0, 15,
                                                      scale_dtype=torch.bfloat16, zero_point_dtype=torch.bfloat16)
        q = _quantize_affine_tinygemm_no_dtype_cast(w16, block, scale, zero, 0, 15)
        return _dequantize_affine_tinygemm_no_dtype_check(q, block, scale, zero, 0, 15,
                                                          output_dtype=torch.bfloat16).to(w.dtype)


def describe_scheme(quant_type: str, group_size: int, device: str | torch.device = "cpu",
                    quantize_head: bool = False) -> dict[str, Any]:
    """The complete weight quantization ``quant_type``/``group_size`` means on ``device``.

    Read off the torchao configuration itself (its class, mapping, packing and parameter choice), so
    everything that can differ between two students is here: what run identity, ``quantization.json``
    and the baseline cache record, and what is compared before a student is resumed, converted or
    evaluated elsewhere (``int4`` is symmetric ``IntxWeightOnlyConfig`` on CPU and asymmetric
    ``Int4WeightOnlyConfig`` on CUDA: the same name, two grids).
    """
    config = base_config(quant_type, group_size, device)
    if isinstance(config, Int4WeightOnlyConfig):
        details = {"mapping": "asymmetric", "packing": config.int4_packing_format.value,
                   "qparams": config.int4_choose_qparams_algorithm.value}
    else:
        details = {"mapping": config.mapping_type.name.lower(), "packing": config.intx_packing_format.value,
                   "qparams": config.intx_choose_qparams_algorithm.value}
    return {"quant_type": quant_type, "group_size": group_size, "config": type(config).__name__, **details,
            "head": "quantized" if quantize_head else "full precision"}


def check_same_scheme(recorded: dict[str, Any] | None, current: dict[str, Any], what: str) -> None:
    """Refuse to go on with ``current`` when ``recorded`` (a student's scheme) differs, naming the difference."""
    if recorded is None:
        return
    diff = {k: (recorded.get(k), current.get(k)) for k in sorted(set(recorded) | set(current))
            if recorded.get(k) != current.get(k)}
    if diff:
        changes = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise QuantizationError(f"{what}: the student was quantized as {recorded['config']} and here it would be "
                                f"quantized differently ({changes}); run it where its scheme is available")


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _checked_config(model: nn.Module, quant_type: str, group_size: int, quantize_head: bool = False) -> AOBaseConfig:
    check_quant_type(quant_type)
    check_group_size(model, group_size, quantize_head)
    if not _quantizable_layers(model, quantize_head):
        raise QuantizationError("the model has no quantizable Linear layers")
    return base_config(quant_type, group_size, _model_device(model))


def _is_quantized_weight(weight: Any) -> bool:
    return isinstance(weight, TorchAOBaseTensor)


def _check_plain(model: nn.Module, action: str, quantize_head: bool = False) -> None:
    # Applying a second quantization on top of the first would silently re-quantize
    # (or fail inside torchao), so refuse it by name.
    for name, mod in _quantizable_layers(model, quantize_head):
        if isinstance(mod, FakeQuantizedLinear) or _is_quantized_weight(mod.weight):
            kind = type(mod).__name__ if isinstance(mod, FakeQuantizedLinear) else type(mod.weight).__name__
            raise QuantizationError(f"cannot {action}: layer {name!r} is already quantized ({kind})")


def prepare_qat(model: nn.Module, quant_type: str, group_size: int, quantize_head: bool = False) -> nn.Module:
    """Swap quantizable Linear layers for fake-quantized ones, in place, for QAT.

    With ``quantize_head`` the output head is fake-quantized too (torchao's default filter, the
    original study's choice). A head tied to the input embedding keeps sharing its latent matrix
    (torchao's swap reuses the Parameter): the embedding lookup reads it in full precision, the
    head computes with its fake-quantized values, and training moves the one shared matrix.
    """
    config = _checked_config(model, quant_type, group_size, quantize_head)
    _check_plain(model, "prepare QAT", quantize_head)
    if _is_tinygemm(config):
        # torchao derives no fake quantizer for this packing: swap the layers with a stand-in weight
        # config, then give each the packing's own quantizer.
        stand_in = IntxFakeQuantizeConfig(torch.int4, group_size=group_size, is_symmetric=False)
        quantize_(model, QATConfig(weight_config=stand_in, step="prepare"), filter_fn=_filter(quantize_head))
        for _, mod in _quantizable_layers(model, quantize_head):
            if isinstance(mod, FakeQuantizedLinear):
                mod.weight_fake_quantizer = TinygemmInt4FakeQuantizer(group_size).to(mod.weight.device)
        return model
    quantize_(model, QATConfig(config, step="prepare"), filter_fn=_filter(quantize_head))
    return model


def _fake_quantizer(config: AOBaseConfig) -> nn.Module:
    """The weight fake quantizer torchao's QAT derives from ``config`` (from a probe layer, rather
    than its private inference helper; quantize_ cannot swap a root module, hence the wrapper)."""
    if isinstance(config, Int4WeightOnlyConfig):
        group_size = config.group_size
        if _is_tinygemm(config):
            return TinygemmInt4FakeQuantizer(group_size)
    else:
        group_size = config.granularity.group_size
    probe = nn.Sequential(nn.Linear(group_size, 1, bias=False))
    quantize_(probe, QATConfig(config, step="prepare"))
    return probe[0].weight_fake_quantizer


def _expected_weight_fq_config(config: AOBaseConfig) -> Any:
    return _fake_quantizer(config).config


# Below this relative weight error a student scheme barely differs from its teacher: warned about.
NEAR_TEACHER_ERROR = 0.01


@torch.no_grad()
def weight_error(model: nn.Module, quant_type: str, group_size: int, quantize_head: bool = False) -> float:
    """Relative error ``||W - Q(W)|| / ||W||`` of the scheme over every layer the student quantizes.

    Zero means the scheme reproduces the model's own weight grid exactly: a teacher that was itself
    quantized on that grid (a GGUF checkpoint, say) would be its own student.
    """
    quantizer = _fake_quantizer(_checked_config(model, quant_type, group_size, quantize_head))
    quantizer.to(_model_device(model))
    diff = norm = 0.0
    for _, mod in _quantizable_layers(model, quantize_head):
        weight = (mod.weight.dequantize() if _is_quantized_weight(mod.weight) else mod.weight).float()
        diff += float((weight - quantizer(weight)).pow(2).sum())
        norm += float(weight.pow(2).sum())
    return math.sqrt(diff / norm) if norm else 0.0


def check_distinct_from_teacher(teacher: nn.Module, quant_type: str, group_size: int,
                                quantize_head: bool = False) -> float:
    """The scheme's :func:`weight_error` against the teacher; refuses a scheme that reproduces the
    teacher exactly (nothing to distil, nothing to compare) and warns when it comes close."""
    error = weight_error(teacher, quant_type, group_size, quantize_head)
    scheme = f"quant_type={quant_type!r} group_size={group_size}"
    if error < 1e-7:
        raise QuantizationError(f"{scheme} reproduces the teacher's own weight grid exactly (relative weight error "
                                f"{error:.1e}): the student would be the teacher; choose another quant_type or "
                                "group_size")
    if error < NEAR_TEACHER_ERROR:
        warnings.warn(f"{scheme} is within {error:.4f} relative weight error of the teacher (below "
                      f"{NEAR_TEACHER_ERROR}): the student starts almost identical to it", stacklevel=2)
    return error


def _describe(fq_config: Any) -> str:
    if fq_config is None:
        return "no weight fake quantizer"
    dtype = getattr(fq_config, "dtype", None)
    return f"{type(fq_config).__name__}(dtype={dtype}, group_size={getattr(fq_config, 'group_size', None)})"


def convert_qat(model: nn.Module, quant_type: str, group_size: int, quantize_head: bool = False) -> nn.Module:
    """Replace fake-quantized layers by real quantized weights, in place (deployment/eval).

    A quantized head tied to the input embedding gets its own quantized weight here; the
    embedding keeps the full-precision matrix.
    """
    config = _checked_config(model, quant_type, group_size, quantize_head)
    fake = [(name, mod) for name, mod in _quantizable_layers(model, quantize_head)
            if isinstance(mod, FakeQuantizedLinear)]
    # torchao's convert skips plain Linear layers, so converting an unprepared model
    # would silently leave it in full precision.
    if not fake:
        raise QuantizationError("no fake-quantized layers to convert; call prepare_qat first")
    expected = _expected_weight_fq_config(config)
    for name, mod in fake:
        got = None if mod.weight_fake_quantizer is None else mod.weight_fake_quantizer.config
        if got != expected:
            raise QuantizationError(
                f"layer {name!r} was prepared as {_describe(got)}, not as "
                f"quant_type={quant_type!r} group_size={group_size}"
            )
    if _is_tinygemm(config):
        _cast_weights_bf16(model, quantize_head)
    quantize_(model, QATConfig(config, step="convert"), filter_fn=_filter(quantize_head))
    return model


def _cast_weights_bf16(model: nn.Module, quantize_head: bool) -> None:
    # The tile-packed int4 tensor is built from bf16 weights only (the fake quantizer casts the same
    # way, so the values are the same); its kernel casts activations itself.
    for _, mod in _quantizable_layers(model, quantize_head):
        if mod.weight.dtype != torch.bfloat16:
            mod.weight = nn.Parameter(mod.weight.detach().to(torch.bfloat16), requires_grad=False)


def quantize_ptq(model: nn.Module, quant_type: str, group_size: int, quantize_head: bool = False) -> nn.Module:
    """Quantize the full-precision weights directly, in place: the no-training baseline."""
    config = _checked_config(model, quant_type, group_size, quantize_head)
    _check_plain(model, "apply PTQ", quantize_head)
    if _is_tinygemm(config):
        _cast_weights_bf16(model, quantize_head)
    quantize_(model, config, filter_fn=_filter(quantize_head))
    return model


@contextlib.contextmanager
def materialized_fake_quant(model: nn.Module) -> Iterator[nn.Module]:
    """Fake-quantize each weight once, instead of at every forward, for fast rollouts.

    Inside the context each active ``FakeQuantizedLinear`` (also under a peft LoRA
    wrapper) holds its fake-quantized weight as a frozen parameter and its weight
    fake quantizer is disabled, so outputs are bit-identical to the fake-quant
    forward. On exit (also on exception) the original latent weight Parameter
    objects are put back, so optimizer state and values are untouched.
    """
    saved: list[tuple[nn.Module, nn.Parameter]] = []
    try:
        for mod, quantizer in active_fake_quantized(model):
            latent = mod.weight
            with torch.no_grad():
                fq_weight = quantizer(latent.detach())
            saved.append((mod, latent))
            # Disable before swapping so a failure in between still gets restored below.
            quantizer.enabled = False
            mod.weight = nn.Parameter(fq_weight, requires_grad=False)
        yield model
    finally:
        for mod, latent in reversed(saved):
            mod.weight = latent
            mod.weight_fake_quantizer.enabled = True


def active_fake_quantized(model: nn.Module) -> Iterator[tuple[FakeQuantizedLinear, nn.Module]]:
    """Each FakeQuantizedLinear (also under a LoRA wrapper) whose weight quantizer is on, with that quantizer."""
    for mod in model.modules():
        quantizer = getattr(mod, "weight_fake_quantizer", None)
        if isinstance(mod, FakeQuantizedLinear) and quantizer is not None and quantizer.enabled:
            yield mod, quantizer


def quantization_summary(model: nn.Module) -> dict[str, int]:
    """Count Linear layers by state: fake-quantized, quantized, full precision, LoRA adapters."""
    counts = {"fake_quantized": 0, "quantized": 0, "full_precision": 0, "lora_adapters": 0}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if any(part.startswith("lora_") for part in name.split(".")):
            counts["lora_adapters"] += 1
        elif isinstance(mod, FakeQuantizedLinear) and mod.weight_fake_quantizer is not None:
            counts["fake_quantized"] += 1
        elif _is_quantized_weight(mod.weight):
            counts["quantized"] += 1
        else:
            counts["full_precision"] += 1
    return counts


def dequantize_for_eval(model: nn.Module, cuda_kernels: bool = True) -> nn.Module:
    """Replace converted quantized weights by plain weights with the same values, once, in place.

    On CPU torchao has no fast low-bit kernel for these weights: the converted model
    dequantizes every weight on every forward (several times the teacher's cost).
    Doing it once gives bit-identical outputs (tested) at the teacher's cost, which
    is what evaluating many lm-eval requests needs. The model is for inference only
    afterwards. Returns the model; a no-op for models without quantized weights.

    On CUDA the weights stay on their int4 kernels (the deployed numerics) unless
    ``cuda_kernels`` is False: then each layer gets the weights its kernel reads, read back
    through an identity input (:func:`kernel_weight`), in the model's dtype. torch's int4
    kernel is much slower than a bf16 matmul at prefill lengths, which is most of an lm-eval
    run; the values are the kernel's own, only the summation order of the products differs.
    """
    for mod in model.modules():
        if not (isinstance(mod, nn.Linear) and _is_quantized_weight(mod.weight)):
            continue
        if mod.weight.device.type != "cuda":
            mod.weight = nn.Parameter(mod.weight.dequantize(), requires_grad=False)
        elif not cuda_kernels:
            mod.weight = nn.Parameter(kernel_weight(mod), requires_grad=False)
    return model


@torch.no_grad()
def kernel_weight(linear: nn.Linear, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The ``[out, in]`` weight a quantized Linear's kernel computes with, as ``dtype``.

    Read through the kernel itself (``linear(I)`` is the transposed weight: each output is one
    weight times 1), so it holds for packings without a ``dequantize`` (the tile-packed int4).
    """
    eye = torch.eye(linear.in_features, device=linear.weight.device, dtype=dtype)
    return torch.nn.functional.linear(eye, linear.weight).T.contiguous()


def _reusing(quantizer: torch.nn.Module, latent: torch.Tensor, shared: torch.Tensor) -> Callable[..., torch.Tensor]:
    compute = quantizer.forward
    version = latent._version

    def forward(weight: torch.Tensor) -> torch.Tensor:
        # Only the exact weight it was computed from, unmodified since, and only while enabled.
        if weight is latent and latent._version == version and quantizer.enabled:
            return shared
        return compute(weight)

    return forward


@contextlib.contextmanager
def fake_quantized_once(model: torch.nn.Module) -> Iterator[int]:
    """Fake-quantize every active weight of ``model`` once, for everything run inside the context.

    Each active ``FakeQuantizedLinear`` (also under a peft LoRA wrapper) gets its weight
    fake-quantized on entry, with the autograd graph back to the latent weight when
    gradients are enabled, and its quantizer returns that tensor instead of recomputing it.
    An on-policy step then quantizes each weight once, where it used to do so twice (once
    for the rollout's materialised weights, once more in the training forward): the
    rollout's forwards read the shared tensors (under ``no_grad``, no graph), the training
    forward uses them with their graph, and backward flows through it to the latent
    weights exactly as in the plain fake-quant forward. Same operations on the same values:
    samples, loss and gradients are bit-identical. A call with any other tensor, or after
    the latent weight changed in place, falls back to the real computation. Yields the
    number of weights shared.
    """
    patched: list[tuple[torch.nn.Module, Any]] = []
    try:
        for mod, quantizer in active_fake_quantized(model):
            latent = mod.weight
            shared = quantizer(latent)
            patched.append((quantizer, quantizer.__dict__.get("forward")))
            quantizer.forward = _reusing(quantizer, latent, shared)
        yield len(patched)
    finally:
        for quantizer, previous in reversed(patched):
            if previous is None:
                del quantizer.forward  # back to the class's method
            else:
                quantizer.forward = previous
