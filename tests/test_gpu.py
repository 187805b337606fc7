"""The GPU check: the original study's code path on CUDA, on a tiny Qwen3 built in the test (no hub).

Run where a GPU is: ``python -m pytest -m gpu tests/test_gpu.py`` (skipped without CUDA). It trains
in bf16 with the CUDA INT4 scheme at λ=0 and λ=1, with LoRA and with full fine-tuning, converts the
students, checks fake-quant against converted numerics, and evaluates one of them (a small offline
benchmark on a fake packaged-data tree, perplexity, fidelity) on the device. Every figure it prints
(timings, parity) goes to the README's GPU section with the machine it ran on.
"""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch
from conftest import chat_rows, make_tokenizer, randomised

from onpolicy_lib import quantization
from onpolicy_lib.config import TrainConfig
from onpolicy_lib.evaluate import EvalConfig, evaluate_runs
from onpolicy_lib.student import load_student
from onpolicy_lib.training import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
GROUP = 32


def make_qwen3(vocab_size: int):
    """A tiny randomly initialised Qwen3 (q/k norms, GQA, tied head as in Qwen3-4B)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=3, bos_token_id=None)
    return randomised(Qwen3ForCausalLM(config)).train()


@pytest.fixture(scope="module")
def qwen_dirs(tmp_path_factory):
    from datasets import Dataset

    root = tmp_path_factory.mktemp("qwen")
    tokenizer = make_tokenizer()
    make_qwen3(len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    Dataset.from_list(chat_rows(40)).save_to_disk(str(root / "data"))
    return root


def converted_weight_gap(fake: torch.nn.Module, real: torch.nn.Module) -> float:
    """Max relative gap between each converted layer's weights, as its kernel computes with them, and
    the fake-quantized weights training used."""
    fakes = dict(quantization.active_fake_quantized(fake))
    names = {mod: name for name, mod in fake.named_modules()}
    real_modules = dict(real.named_modules())
    worst, compared = 0.0, 0
    dtype = real.get_input_embeddings().weight.dtype
    with torch.no_grad():
        for mod, quantizer in fakes.items():
            compared += 1
            name = names[mod]
            trained = quantizer(mod.weight).float()
            kernel = quantization.kernel_weight(real_modules[name], dtype).float()
            worst = max(worst, float((kernel - trained).abs().max() / trained.abs().max()))
    assert compared and compared == quantization.quantization_summary(real)["quantized"]
    return worst


@pytest.mark.parametrize("lora_r", [8, None], ids=["lora", "full"])
@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_trains_converts_and_matches_on_cuda(qwen_dirs, tmp_path, lmbda, lora_r):
    cfg = TrainConfig(model_name=str(qwen_dirs / "model"), dataset_name=str(qwen_dirs / "data"), group_size=GROUP,
                      quantize_head=True, lora_r=lora_r, lora_alpha=16, lmbda=lmbda, beta=1.0, max_steps=3,
                      max_length=96, max_new_tokens=8, min_new_tokens=4, min_completion_tokens=4,
                      learning_rate=1e-5, heldout_eval_size=4, output_dir=str(tmp_path / "run"), device="cuda")
    start = time.perf_counter()
    run = train(cfg)
    record = json.loads((run.path / "config.json").read_text())
    assert record["resolved"]["dtype"] == "torch.bfloat16"
    assert record["resolved"]["scheme"]["config"] == "Int4WeightOnlyConfig"
    assert record["resolved"]["scheme"]["packing"] == "tile_packed_to_4d"
    assert all(step["loss"] > 0 for step in run.metrics["steps"])
    fake = load_student(run.path, convert=False, device="cuda", dtype=torch.bfloat16)
    # A LoRA student is compared in its adapter form (int4 base + bf16 adapter): training's numerics.
    real = load_student(run.path, convert=True, device="cuda", dtype=torch.bfloat16, lora_mode="adapter")
    assert quantization.quantization_summary(real)["quantized"] > 0
    ids = torch.randint(4, 40, (2, 24), device="cuda")
    with torch.no_grad():
        a, b = fake(ids).logits.float(), real(ids).logits.float()
    gap = float((a - b).abs().max() / a.abs().max())
    weight_gap = converted_weight_gap(fake, real)
    packing = record["resolved"]["scheme"]["packing"]
    print(f"\nGPU check {packing} lmbda={lmbda} lora_r={lora_r}: train {time.perf_counter() - start:.1f} s, "
          f"converted vs fake-quantized weights: max relative gap {weight_gap:.2e}; logits: {gap:.2e}")
    # The kernel's weights, read back through an identity input, are the fake-quantized ones within
    # one bf16 rounding (it dequantizes in higher precision); logits differ by that and bf16 sums.
    assert weight_gap < 1e-2
    assert gap < 0.05
    # Evaluation without the int4 kernels runs bf16 matmuls on the very weights they read.
    read_back = quantization.dequantize_for_eval(copy.deepcopy(real), cuda_kernels=False)
    assert quantization.quantization_summary(read_back)["quantized"] == 0
    with torch.no_grad():
        c = read_back(ids).logits.float()
    assert float((c - b).abs().max() / b.abs().max()) < 0.02


def test_evaluates_on_cuda(qwen_dirs, tmp_path):
    from test_benchmarks import build_fake_tree, make_ascii_tokenizer

    from onpolicy_lib import benchmarks
    from onpolicy_lib.perplexity import sliding_window_perplexity

    cfg = TrainConfig(model_name=str(qwen_dirs / "model"), dataset_name=str(qwen_dirs / "data"), group_size=GROUP,
                      lora_r=8, lora_alpha=16, lmbda=1.0, max_steps=2, max_length=96, max_new_tokens=8,
                      min_completion_tokens=4, heldout_eval_size=4, output_dir=str(tmp_path / "run"), device="cuda")
    run = train(cfg)
    table = evaluate_runs(EvalConfig(run_dirs=[str(run.path)], tasks=[], perplexity_tokens=0, fidelity_samples=4,
                                     cache_dir=str(tmp_path / "eval-cache"), device="cuda"))
    # teacher, PTQ, and the LoRA student in both deployed forms (merged, adapter on the int4 base)
    assert (table["forward_kl"].dropna() >= 0).all() and len(table) == 4
    student = quantization.dequantize_for_eval(load_student(run.path, convert=True, device="cuda",
                                                            dtype=torch.bfloat16))
    assert quantization.quantization_summary(student)["quantized"] > 0  # evaluated on the int4 kernels
    ascii_tokenizer = make_ascii_tokenizer()
    model = make_qwen3(len(ascii_tokenizer)).to("cuda", torch.bfloat16)
    build_fake_tree(tmp_path / "data", n=4)
    scores = benchmarks.evaluate_benchmarks(model, ascii_tokenizer, ["arc_easy"], limit=4, root=tmp_path / "data",
                                            device="cuda")
    assert 0 <= scores["tasks"]["arc_easy"]["acc"] <= 1
    ppl = sliding_window_perplexity(student, make_tokenizer(), "what is 3 + 4? it is 7. " * 20, max_length=64,
                                     stride=32)
    assert ppl["perplexity"] > 1


@pytest.mark.parametrize("quant_type", ["int8", "int3", "int2"])
def test_other_bit_widths_train_and_convert_on_cuda(qwen_dirs, tmp_path, quant_type):
    """The ladder's other rungs on CUDA: torchao's IntxWeightOnlyConfig (symmetric), as on CPU."""
    cfg = TrainConfig(model_name=str(qwen_dirs / "model"), dataset_name=str(qwen_dirs / "data"), group_size=GROUP,
                      quant_type=quant_type, lmbda=1.0, beta=1.0, max_steps=2, max_length=96, max_new_tokens=8,
                      min_completion_tokens=4, heldout_eval_size=4, output_dir=str(tmp_path / "run"), device="cuda")
    run = train(cfg)
    scheme = json.loads((run.path / "config.json").read_text())["resolved"]["scheme"]
    assert (scheme["config"], scheme["mapping"]) == ("IntxWeightOnlyConfig", "symmetric")
    fake = load_student(run.path, convert=False, device="cuda", dtype=torch.bfloat16)
    real = load_student(run.path, convert=True, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(4, 40, (2, 24), device="cuda")
    with torch.no_grad():
        a, b = fake(ids).logits.float(), real(ids).logits.float()
    gap = float((a - b).abs().max() / a.abs().max())
    weight_gap = converted_weight_gap(fake, real)
    print(f"\nGPU check {quant_type}: converted vs fake-quantized weights {weight_gap:.2e}; logits {gap:.2e}")
    assert weight_gap < 1e-2 and gap < 0.05
