"""Deployment forms of a student and their numerics (tiny models)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from onpolicy_lib import quantization
from onpolicy_lib.student import build_student, load_student, save_student

GROUP = 32


@pytest.fixture
def lora_run(tmp_path, tiny_model, tiny_model_dir):
    student = build_student(tiny_model, "int4", GROUP, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    # A trained adapter is not zero: give lora_B values so the adapter path is exercised.
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_student(student, tmp_path / "run", str(tiny_model_dir), "int4", GROUP)
    return tmp_path / "run", student.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_lora_adapter_form_matches_training_numerics_and_merge_does_not(lora_run):
    run_dir, trained = lora_run
    ids = torch.randint(4, 40, (2, 16))
    training = logits(trained, ids)
    adapter = load_student(run_dir, convert=True, lora_mode="adapter")
    assert quantization.quantization_summary(adapter)["quantized"] > 0
    torch.testing.assert_close(logits(adapter, ids), training, rtol=0, atol=1e-5)
    merged = load_student(run_dir, convert=True, lora_mode="merge")
    gap = (logits(merged, ids) - training).abs().max()
    assert gap > 1e-3, "Q(W + BA) should differ from Q(W) + BA"


def test_bad_lora_mode(lora_run):
    with pytest.raises(ValueError, match="lora_mode must be one of merge, adapter"):
        load_student(lora_run[0], lora_mode="both")


def test_missing_student_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trained student"):
        load_student(tmp_path)


def test_dequantize_for_eval_is_bit_identical(tiny_model):
    model = quantization.quantize_ptq(copy.deepcopy(tiny_model), "int4", GROUP)
    ids = torch.randint(4, 40, (2, 16))
    before = logits(model, ids)
    quantization.dequantize_for_eval(model)
    assert quantization.quantization_summary(model)["quantized"] == 0
    assert torch.equal(logits(model, ids), before)


def test_kernel_weight_reads_back_the_weights_the_kernel_uses(tiny_model):
    model = copy.deepcopy(tiny_model)
    quantization.quantize_ptq(model, "int4", 32)
    layer = model.model.layers[0].mlp.down_proj
    assert torch.equal(quantization.kernel_weight(layer, torch.float32), layer.weight.dequantize())


def test_student_of_a_frozen_teacher_is_trainable(tiny_model):
    # A trainer freezes its teacher; a student built from that same object must still train.
    tiny_model.requires_grad_(False)
    student = build_student(tiny_model, "int4", GROUP)
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in tiny_model.parameters())


def test_the_scheme_is_recorded_and_converting_on_another_grid_is_refused(tmp_path, tiny_model, tiny_model_dir):
    student = build_student(tiny_model, "int4", GROUP)
    save_student(student, tmp_path / "run", str(tiny_model_dir), "int4", GROUP)
    meta = json.loads((tmp_path / "run" / "student" / "quantization.json").read_text())
    assert meta["scheme"] == {"quant_type": "int4", "group_size": GROUP, "config": "IntxWeightOnlyConfig",
                              "mapping": "symmetric", "packing": "unpacked_to_int8", "qparams": "affine",
                              "head": "full precision"}
    # What the same name means on CUDA: another config, another grid.
    cuda = quantization.describe_scheme("int4", GROUP, "cuda")
    assert (cuda["config"], cuda["mapping"]) == ("Int4WeightOnlyConfig", "asymmetric")
    meta["scheme"] = cuda  # as if trained on a GPU
    (tmp_path / "run" / "student" / "quantization.json").write_text(json.dumps(meta))
    with pytest.raises(quantization.QuantizationError, match=r"on cpu: .*mapping: 'asymmetric' -> 'symmetric'"):
        load_student(tmp_path / "run", convert=True)


def test_a_quantized_head_shares_the_tied_matrix_in_training_and_is_quantized_alone_when_converted(tiny_model):
    head, embedding = tiny_model.get_output_embeddings(), tiny_model.get_input_embeddings()
    assert head.weight is embedding.weight  # tied, as SmolLM2's and Qwen3-4B's are
    original = embedding.weight.detach().clone()
    student = quantization.prepare_qat(copy.deepcopy(tiny_model), "int4", GROUP, quantize_head=True)
    assert quantization.quantization_summary(student)["fake_quantized"] == 2 * 7 + 1
    assert student.lm_head.weight is student.model.embed_tokens.weight  # one latent matrix, trained once
    ids = torch.randint(4, 40, (2, 16))
    fake = logits(student, ids)
    assert not torch.equal(fake, logits(quantization.prepare_qat(copy.deepcopy(tiny_model), "int4", GROUP), ids))
    quantization.convert_qat(student, "int4", GROUP, quantize_head=True)
    assert torch.equal(logits(student, ids), fake)  # converted == fake-quantized, head included
    assert quantization.quantization_summary(student)["quantized"] == 2 * 7 + 1
    assert torch.equal(student.model.embed_tokens.weight, original)  # the input embedding stays full precision
    ptq = quantization.quantize_ptq(copy.deepcopy(tiny_model), "int4", GROUP, quantize_head=True)
    assert quantization.quantization_summary(ptq)["quantized"] == 2 * 7 + 1


@pytest.mark.parametrize("kind", ["latent", "lora", "head"])
def test_export_reloads_without_the_library_and_scores_the_same(tmp_path, tiny_model, tiny_model_dir, tokenizer,
                                                                 kind):
    from transformers import AutoModelForCausalLM

    from onpolicy_lib.student import export_student

    head = kind == "head"
    student = build_student(tiny_model, "int4", GROUP, lora_r=4 if kind == "lora" else None, lora_dropout=0.0,
                            quantize_head=head)
    torch.manual_seed(2)
    with torch.no_grad():  # a trained student is not its teacher
        for p in student.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    scheme = quantization.describe_scheme("int4", GROUP, quantize_head=head)
    save_student(student, tmp_path / "run", str(tiny_model_dir), "int4", GROUP, tokenizer, scheme)
    out = export_student(tmp_path / "run", tmp_path / "export")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    assert "quantization_config" in json.loads((out / "config.json").read_text())
    exported = AutoModelForCausalLM.from_pretrained(out)  # plain transformers: no onpolicy_lib involved
    assert quantization.quantization_summary(exported)["quantized"] == 2 * 7 + head
    ids = torch.randint(4, 40, (2, 16))
    assert torch.equal(logits(exported, ids), logits(load_student(tmp_path / "run", convert=True), ids))
    with pytest.raises(FileExistsError, match="not empty"):
        export_student(tmp_path / "run", tmp_path / "export")
