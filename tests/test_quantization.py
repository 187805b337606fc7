"""Quantization helpers on tiny random Llama models (no network, no assets)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn
from torchao.quantization.qat.linear import FakeQuantizedLinear
from transformers import LlamaConfig, LlamaForCausalLM

from onpolicy_lib import quantization as q

VOCAB = 64


def tiny_llama(hidden: int = 64, intermediate: int = 128, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def greedy(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(tokens, max_new_tokens=8, do_sample=False, pad_token_id=0)


def latent_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# --- (1) QAT parity and (2) PTQ == prepare + convert -------------------------------------------


@pytest.mark.parametrize("quant_type", q.QUANT_TYPES)
def test_convert_is_bit_exact_with_fake_quant(model, tokens, quant_type):
    q.prepare_qat(model, quant_type, 32)
    assert q.quantization_summary(model) == {
        "fake_quantized": 14,
        "quantized": 0,
        "full_precision": 1,
        "lora_adapters": 0,
    }
    fake = logits(model, tokens)
    q.convert_qat(model, quant_type, 32)
    assert q.quantization_summary(model)["quantized"] == 14
    assert torch.equal(fake, logits(model, tokens))


@pytest.mark.parametrize("quant_type", ["int4", "int2"])
def test_ptq_equals_prepare_then_convert(model, tokens, quant_type):
    ptq = q.quantize_ptq(copy.deepcopy(model), quant_type, 32)
    qat = q.convert_qat(q.prepare_qat(model, quant_type, 32), quant_type, 32)
    assert q.quantization_summary(ptq) == q.quantization_summary(qat)
    assert torch.equal(logits(ptq, tokens), logits(qat, tokens))
    wp = ptq.model.layers[1].mlp.down_proj.weight
    wq = qat.model.layers[1].mlp.down_proj.weight
    assert torch.equal(wp.qdata, wq.qdata) and torch.equal(wp.scale, wq.scale)


def test_weights_really_use_the_requested_bits(model):
    q.quantize_ptq(model, "int3", 32)
    qdata = model.model.layers[0].self_attn.q_proj.weight.qdata
    assert qdata.min() >= -4 and qdata.max() <= 3


# --- (3) group sizes and (4) quant types --------------------------------------------------------


def test_group_size_error_names_layer_and_valid_sizes(model):
    with pytest.raises(q.QuantizationError) as err:
        q.check_group_size(model, 48)
    msg = str(err.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "in_features=64" in msg
    assert "64, 32, 16" in msg


def test_group_size_error_for_a_layer_deeper_in_the_model():
    # hidden 64 / intermediate 96: 64 divides the attention and up/gate inputs, not down_proj's.
    model = tiny_llama(hidden=64, intermediate=96)
    expected = r"in_features=96 of layer 'model.layers.0.mlp.down_proj'.*: 32, 16"
    with pytest.raises(q.QuantizationError, match=expected):
        q.prepare_qat(model, "int4", 64)
    assert q.quantization_summary(model)["fake_quantized"] == 0  # failed before touching the model
    q.check_group_size(model, 32)


@pytest.mark.parametrize("bad", [0, -32])
def test_non_positive_group_size(model, bad):
    with pytest.raises(q.QuantizationError, match="positive"):
        q.check_group_size(model, bad)


def test_default_group_size():
    assert q.default_group_size(tiny_llama()) == 64
    assert q.default_group_size(nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256))) == 128
    # SmolLM2-135M shapes: hidden 576, intermediate 1536 (128 does not divide 576).
    smol = nn.Sequential(nn.Linear(576, 1536), nn.Linear(1536, 576))
    assert q.default_group_size(smol) == 64
    assert q.valid_group_sizes(smol)[:3] == [192, 96, 64]
    assert q.default_group_size(nn.Sequential(nn.Linear(96, 96))) == 32
    with pytest.raises(q.QuantizationError, match="valid group sizes: 48, 24, 16"):
        q.default_group_size(nn.Sequential(nn.Linear(48, 48)))


def test_unknown_quant_type(model):
    with pytest.raises(q.QuantizationError, match="'int5'.*int4, int8, int3, int2"):
        q.check_quant_type("int5")
    with pytest.raises(ValueError, match="'fp8'"):
        q.prepare_qat(model, "fp8", 32)
    with pytest.raises(q.QuantizationError):
        q.base_config("nf4", 32)


def test_base_config_is_symmetric_intx_on_cpu():
    config = q.base_config("int8", 64)
    assert config.weight_dtype == torch.int8
    assert config.granularity.group_size == 64
    assert config.mapping_type == q.MappingType.SYMMETRIC


def test_misuse_is_refused(model):
    with pytest.raises(q.QuantizationError, match="prepare_qat first"):
        q.convert_qat(model, "int4", 32)
    q.prepare_qat(model, "int4", 32)
    with pytest.raises(q.QuantizationError, match="already quantized"):
        q.prepare_qat(model, "int4", 32)
    with pytest.raises(q.QuantizationError, match="already quantized"):
        q.quantize_ptq(model, "int4", 32)
    with pytest.raises(q.QuantizationError, match="prepared as .*int4.*group_size=32.*'int8'"):
        q.convert_qat(model, "int8", 32)


# --- (5) what is quantized ----------------------------------------------------------------------


def test_lm_head_stays_full_precision(model):
    q.prepare_qat(model, "int4", 32)
    assert type(model.lm_head) is nn.Linear
    q.convert_qat(model, "int4", 32)
    assert type(model.lm_head) is nn.Linear and type(model.lm_head.weight) is nn.Parameter
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert type(model.model.embed_tokens.weight) is nn.Parameter


def test_is_quantizable_names():
    linear = nn.Linear(8, 8)
    assert q.is_quantizable(linear, "model.layers.0.mlp.up_proj")
    assert q.is_quantizable(linear, "base_model.model.model.layers.0.self_attn.q_proj.base_layer")
    assert not q.is_quantizable(linear, "lm_head")
    assert not q.is_quantizable(linear, "base_model.model.lm_head")
    assert not q.is_quantizable(linear, "model.layers.0.self_attn.q_proj.lora_A.default")
    assert not q.is_quantizable(linear, "model.layers.0.self_attn.q_proj.lora_B.default")
    assert not q.is_quantizable(nn.Embedding(8, 8), "model.embed_tokens")


# --- (6) fake quant is not a no-op and trains through the STE -----------------------------------


def test_fake_quant_changes_outputs_and_passes_gradients(model, tokens):
    teacher = logits(model, tokens)
    q.prepare_qat(model, "int4", 32).train()
    out = model(tokens).logits
    assert not torch.allclose(out, teacher, atol=1e-4)
    out.float().logsumexp(-1).mean().backward()
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, FakeQuantizedLinear)
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert torch.isfinite(layer.weight.grad).all()


# --- (7) materialized fake quant ----------------------------------------------------------------


def check_materialized(model: nn.Module, tokens: torch.Tensor) -> None:
    fake, fake_tokens = logits(model, tokens), greedy(model, tokens)
    before = latent_weights(model)
    params = dict(model.named_parameters())
    layers = [m for m in model.modules() if isinstance(m, FakeQuantizedLinear)]
    with q.materialized_fake_quant(model) as same:
        assert same is model
        assert all(not m.weight_fake_quantizer.enabled and not m.weight.requires_grad for m in layers)
        assert torch.equal(logits(model, tokens), fake)
        assert torch.equal(greedy(model, tokens), fake_tokens)
    assert all(m.weight_fake_quantizer.enabled for m in layers)
    after = dict(model.named_parameters())
    assert after.keys() == params.keys() and all(after[k] is params[k] for k in params)
    assert all(torch.equal(before[k], p.detach()) for k, p in after.items())
    assert torch.equal(logits(model, tokens), fake)


def test_materialized_fake_quant_matches_and_restores(model, tokens):
    q.prepare_qat(model, "int4", 32)
    check_materialized(model, tokens)


def test_materialized_fake_quant_restores_on_exception(model, tokens):
    q.prepare_qat(model, "int8", 64)
    before = latent_weights(model)
    with pytest.raises(RuntimeError, match="boom"), q.materialized_fake_quant(model):
        raise RuntimeError("boom")
    assert all(torch.equal(before[k], p) for k, p in model.named_parameters())
    assert all(m.weight_fake_quantizer.enabled for m in model.modules() if isinstance(m, FakeQuantizedLinear))
    assert all(p.requires_grad for p in model.parameters())


def test_materialized_fake_quant_under_lora(model, tokens):
    q.prepare_qat(model, "int4", 32)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    # LoRA B starts at zero; make the adapters matter so the check covers their path too.
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    lora.eval()
    assert q.quantization_summary(lora) == {
        "fake_quantized": 14,
        "quantized": 0,
        "full_precision": 1,
        "lora_adapters": 8,
    }
    base = lora.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(base, FakeQuantizedLinear)
    check_materialized(lora, tokens)
    # LoRA adapters still train inside the context (only the frozen base is materialized).
    with q.materialized_fake_quant(lora):
        lora.train()
        lora(tokens).logits.float().logsumexp(-1).mean().backward()
    grads = [p.grad for name, p in lora.named_parameters() if "lora_A" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_a_scheme_that_reproduces_the_teacher_grid_is_refused(model, monkeypatch):
    assert q.weight_error(model, "int4", 32) > 0.05  # random weights: far from any int4 grid
    q.check_distinct_from_teacher(model, "int4", 32)
    # The symmetric CPU grid never reproduces a teacher, even one already on it: re-quantizing a
    # quantized group shrinks it by 7/7.5 (its largest value maps to 7, not 7.5, steps).
    on_grid = q.convert_qat(q.prepare_qat(copy.deepcopy(model), "int4", 32), "int4", 32)
    q.dequantize_for_eval(on_grid)
    assert q.weight_error(on_grid, "int4", 32) == pytest.approx(1 / 15, rel=1e-4)
    # A scheme that does reproduce the teacher's grid (as an asymmetric 4-bit grid reproduces a
    # Q4_1 GGUF teacher with the same blocks) is refused: the student would be the teacher.
    monkeypatch.setattr(q, "_fake_quantizer", lambda config: nn.Identity())
    assert q.weight_error(model, "int4", 32) == 0.0
    with pytest.raises(q.QuantizationError, match="reproduces the teacher's own weight grid exactly"):
        q.check_distinct_from_teacher(model, "int4", 32)
    monkeypatch.undo()
    # A scheme close to the teacher is allowed, with a warning: int8 changes the weights very little.
    with pytest.warns(UserWarning, match="relative weight error of the teacher"):
        error = q.check_distinct_from_teacher(model, "int8", 32)
    assert 0 < error < q.NEAR_TEACHER_ERROR


def test_cuda_int4_packs_for_torchs_own_kernels_and_the_packing_is_part_of_the_scheme(monkeypatch):
    q.check_kernels("int4", "cpu")  # symmetric IntxWeightOnlyConfig: torch's own ops
    q.check_kernels("int8", "cuda")
    tile = q.describe_scheme("int4", 128, "cuda")
    assert (tile["config"], tile["mapping"], tile["packing"]) == ("Int4WeightOnlyConfig", "asymmetric",
                                                                   "tile_packed_to_4d")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(q.QuantizationError, match=r"^quant_type 'int4' on this GPU \(compute capability 7.5\)"):
        q.check_kernels("int4", "cuda", 128)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    q.check_kernels("int4", "cuda", 128)
    with pytest.raises(q.QuantizationError, match=r"^group_size 48 with quant_type 'int4' on CUDA"):
        q.check_kernels("int4", "cuda", 48)
    # A student trained with one packing is not converted with the other: the difference is named.
    monkeypatch.setattr(q, "CUDA_INT4_PACKING", "plain")
    with pytest.raises(q.QuantizationError, match="packing: 'tile_packed_to_4d' -> 'plain'"):
        q.check_same_scheme(tile, q.describe_scheme("int4", 128, "cuda"), "run_dir x on cuda")


def test_tinygemm_fake_quantizer_is_the_packings_own_quantization():
    """Fake quantization for torch's int4 kernels computes exactly what converting to them stores."""
    from torchao.quantization.quant_primitives import (
        MappingType,
        _choose_qparams_affine_tinygemm,
        _dequantize_affine_tinygemm,
        _quantize_affine_tinygemm,
    )

    torch.manual_seed(0)
    w = (torch.randn(48, 256) * 0.05).requires_grad_()
    block = (1, 64)
    w16 = w.detach().to(torch.bfloat16)
    # The calls Int4TilePackedTo4dTensor.from_hp makes (torchao's tile_packed_to_4d packing).
    scale, zero = _choose_qparams_affine_tinygemm(w16, MappingType.ASYMMETRIC, block, torch.int32, 0, 15,
                                                  scale_dtype=torch.bfloat16, zero_point_dtype=torch.bfloat16)
    int_data = _quantize_affine_tinygemm(w16, block, scale, zero, torch.int32, 0, 15)
    stored = _dequantize_affine_tinygemm(int_data, block, scale, zero, torch.int32, 0, 15,
                                         output_dtype=torch.bfloat16)
    fake = q.TinygemmInt4FakeQuantizer(64)(w)
    assert fake.dtype == torch.float32 and torch.equal(fake, stored.float())
    assert max(len(torch.unique(g)) for g in fake.detach().view(48, 4, 64).flatten(0, 1)) <= 16
    fake.square().sum().backward()  # straight-through rounding: every latent weight gets a gradient
    assert torch.isfinite(w.grad).all() and (w.grad != 0).float().mean() > 0.9


def test_tinygemm_packing_prepares_its_own_fake_quantizer(monkeypatch):
    from torchao.quantization import Int4WeightOnlyConfig
    from torchao.quantization.quantize_.workflows import Int4PackingFormat

    monkeypatch.setattr(q, "base_config", lambda quant_type, group_size, device="cpu": Int4WeightOnlyConfig(
        group_size=group_size, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D))
    model = tiny_llama()
    q.prepare_qat(model, "int4", 32)
    quantizers = [mod.weight_fake_quantizer for _, mod in q._quantizable_layers(model)]
    assert quantizers and all(isinstance(x, q.TinygemmInt4FakeQuantizer) for x in quantizers)
    assert q._expected_weight_fq_config(q.base_config("int4", 32)) == quantizers[0].config
    assert q._expected_weight_fq_config(q.base_config("int4", 64)) != quantizers[0].config
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        reference = model(ids).logits
        with q.materialized_fake_quant(model):  # fast rollouts: same values
            assert torch.equal(model(ids).logits, reference)
