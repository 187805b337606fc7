"""Integration tests on the packaged SmolLM2-135M-Instruct (offline assets, a handful of steps)."""

from __future__ import annotations

import pytest
import torch

from onpolicy_lib import assets, quantization
from onpolicy_lib.config import TrainConfig
from onpolicy_lib.models import load_model, load_tokenizer
from onpolicy_lib.student import load_student
from onpolicy_lib.training import train

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not assets.assets_ready(), reason="offline assets missing: python -m onpolicy_lib.assets"),
]


@pytest.fixture(scope="module")
def teacher():
    return load_model(assets.PACKAGED_MODEL)


def test_packaged_model_chats(teacher):
    tokenizer = load_tokenizer(assets.PACKAGED_MODEL)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = teacher.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


def test_int4_qat_parity_on_the_packaged_model(teacher):
    import copy

    student = quantization.prepare_qat(copy.deepcopy(teacher), "int4", 64)
    ids = torch.randint(100, 40000, (2, 24))
    with torch.no_grad():
        fake = student(ids).logits
        quantization.convert_qat(student, "int4", 64)
        real = student(ids).logits
        plain = teacher(ids).logits
    assert torch.equal(fake, real)
    assert not torch.allclose(fake, plain)  # INT4 really changes the model


def test_group_size_128_is_refused_up_front(tmp_path):
    with pytest.raises(quantization.QuantizationError, match=r"group_size 128 .*in_features=576.*valid"):
        train(TrainConfig(group_size=128, output_dir=str(tmp_path / "g128")))
    assert not (tmp_path / "g128").exists()


def test_a_few_distillation_steps(tmp_path):
    cfg = TrainConfig(max_steps=3, lmbda=0.5, max_new_tokens=8, heldout_eval_size=2, save_steps=10,
                      output_dir=str(tmp_path / "run"))
    result = train(cfg)
    assert len(result.losses) == 3 and all(loss > 0 for loss in result.losses)
    assert result.metrics["train_examples"] > 1000
    student = load_student(result.path, convert=True)
    assert quantization.quantization_summary(student)["quantized"] == 210
