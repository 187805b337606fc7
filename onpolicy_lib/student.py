"""The student: the teacher's own weights, quantization-aware, optionally with LoRA.

Saved as the *latent* full-precision weights (or the LoRA adapter) plus a
``quantization.json``; loading re-applies the same deterministic torchao
steps, so ``load_student(run_dir)`` returns the deployable quantized model
(``convert=True``) or the fake-quantized training model (``convert=False``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import PreTrainedModel

from onpolicy_lib import quantization
from onpolicy_lib.models import load_model, load_skeleton
from onpolicy_lib.rundir import Run, write_json


def build_student(teacher: PreTrainedModel, quant_type: str, group_size: int, lora_r: int | None = None,
                  lora_alpha: int = 16, lora_dropout: float = 0.05,
                  train_embeddings: bool = True, quantize_head: bool = False) -> torch.nn.Module:
    """A fake-quantized copy of the teacher, with LoRA adapters when ``lora_r`` is set.

    The embedding and output-head matrices are not quantized (the head is kept in full precision;
    many models tie the two). ``train_embeddings=False`` freezes them, so training only moves the
    weights the student quantizes (with LoRA they are frozen in any case).

    Weights that train are float32 (master weights) whatever the teacher computes in: a bf16 weight
    of magnitude above about 0.004 cannot take a 1e-5 step (``0.02 + 1e-5 == 0.02`` in bf16), so
    full fine-tuning from a bf16 teacher gets an fp32 copy, run under bf16 autocast by the trainer;
    LoRA keeps the frozen base in the teacher's dtype and its adapters in float32 (peft's default).
    """
    student = copy.deepcopy(teacher)
    if lora_r is None and any(p.dtype in (torch.bfloat16, torch.float16) for p in student.parameters()):
        student.float()
    # The teacher may already be frozen (a trainer sets requires_grad=False on it); the copy must train.
    student.requires_grad_(True)
    if not train_embeddings:
        for module in (student.get_input_embeddings(), student.get_output_embeddings()):
            if module is not None:
                module.requires_grad_(False)
    quantization.prepare_qat(student, quant_type, group_size, quantize_head)
    if lora_r is not None:
        from peft import LoraConfig, get_peft_model

        # LoRA on the linear layers only; the quantized base weights stay frozen.
        config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                            target_modules="all-linear", task_type="CAUSAL_LM")
        student = get_peft_model(student, config)
    student.train()
    return student


def save_student(student: torch.nn.Module, run_dir: Path, model_name: str, quant_type: str,
                 group_size: int, tokenizer=None, scheme: dict | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """The latent weights (or adapter) and ``quantization.json``: how to quantize them again, and the
    complete scheme they were trained under (:func:`quantization.describe_scheme`; default: CPU's).

    ``state_dict``: the student's whole weights when ``student`` itself holds only a shard (fsdp).
    """
    run = Run(Path(run_dir))
    out = run.student_dir
    out.mkdir(parents=True, exist_ok=True)
    # FakeQuantizedLinear keeps the parameter names of nn.Linear, so the latent
    # weights save and load as an ordinary checkpoint of the base architecture.
    student.save_pretrained(out, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    is_lora = hasattr(student, "peft_config")
    scheme = scheme or quantization.describe_scheme(quant_type, group_size)
    meta = {"model_name": model_name, "quant_type": quant_type, "group_size": group_size,
            "quantize_head": scheme["head"] == "quantized", "scheme": scheme,
            "format": "lora-adapter" if is_lora else "latent-weights",
            "note": "latent full-precision weights trained through torchao fake quantization; "
                    "load with onpolicy_lib.student.load_student to get the quantized model"}
    write_json(out / run.SCHEME, meta)
    return out


LORA_MODES = ("merge", "adapter")


def load_student(run_dir: str | Path, convert: bool = True, device: str = "cpu",
                 dtype: torch.dtype | None = None, lora_mode: str = "merge") -> torch.nn.Module:
    """The trained student of a run directory: quantized for deployment (``convert``), or fake-quantized.

    For LoRA students ``lora_mode`` picks the deployment form:

    * ``"merge"`` — merge the adapter into the latent weights, then quantize: one plain
      low-bit model, the usual way to ship. Its numerics are *not* those of training,
      where the adapter was added on top of the already quantized base: Q(W + BA) != Q(W) + BA.
    * ``"adapter"`` — quantize the base weights and keep the small adapter in full
      precision on top: exactly the training numerics (tested), at the cost of an unmerged adapter.
    """
    if lora_mode not in LORA_MODES:
        raise ValueError(f"lora_mode must be one of {', '.join(LORA_MODES)}; got {lora_mode!r}")
    run = Run(Path(run_dir))
    src = run.student_dir
    meta = run.student_scheme()
    head = meta.get("quantize_head", False)
    if convert:  # converting elsewhere must not silently put the student on another grid
        here = quantization.describe_scheme(meta["quant_type"], meta["group_size"], device, head)
        quantization.check_same_scheme(meta.get("scheme"), here, f"run_dir {run.path.name} on {device}")
    if meta["format"] == "lora-adapter":
        from peft import PeftModel

        base = load_model(meta["model_name"], device=device, dtype=dtype)
        quantization.prepare_qat(base, meta["quant_type"], meta["group_size"], head)
        model = PeftModel.from_pretrained(base, src)
        if convert and lora_mode == "merge":
            model = model.merge_and_unload()
    else:
        model = load_model(str(src), device=device, dtype=dtype)
        quantization.prepare_qat(model, meta["quant_type"], meta["group_size"], head)
    if convert:
        # With an unmerged adapter only the base layers are converted (is_quantizable skips lora_*).
        quantization.convert_qat(model, meta["quant_type"], meta["group_size"], head)
    return model.eval()


def export_student(run_dir: str | Path, out_dir: str | Path, device: str = "cpu") -> Path:
    """The trained student as a plain transformers checkpoint with torchao-quantized weights.

    ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it without this library (transformers and
    torchao only), already quantized, and scores exactly what ``load_student(run_dir)`` scores
    (tested): transformers' own torchao integration quantizes the latent weights with the student's
    torchao configuration, the same deterministic step as converting the fake-quantized model, and
    serialises the quantized tensors to safetensors with that configuration in ``config.json``. A
    LoRA student is exported in its usual deployed form, the adapter merged into the latent weights
    before quantization (``lora_mode="merge"``). The tokenizer is saved beside it. Refuses an
    existing non-empty ``out_dir``.
    """
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, TorchAoConfig

    run = Run(Path(run_dir))
    meta = run.student_scheme()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"out_dir {out} is not empty; choose another or delete it")
    head = meta.get("quantize_head", False)
    here = quantization.describe_scheme(meta["quant_type"], meta["group_size"], device, head)
    quantization.check_same_scheme(meta.get("scheme"), here, f"exporting {run.path.name} on {device}")
    skeleton = load_skeleton(str(run.student_dir) if meta["format"] == "latent-weights" else meta["model_name"])
    embedding = next(name for name, module in skeleton.named_modules() if module is skeleton.get_input_embeddings())
    head_name = next(name for name, module in skeleton.named_modules() if module is skeleton.get_output_embeddings())
    tied = bool(getattr(skeleton.config, "tie_word_embeddings", False))
    # transformers leaves embeddings and head alone unless told; the input embedding is never quantized.
    config = TorchAoConfig(quant_type=quantization.base_config(meta["quant_type"], meta["group_size"], device),
                           include_input_output_embeddings=head,
                           modules_to_not_convert=[embedding] if head else [head_name])
    with tempfile.TemporaryDirectory() as tmp:
        latent = run.student_dir
        if meta["format"] == "lora-adapter" or (head and tied):
            if meta["format"] == "lora-adapter":
                from peft import PeftModel

                base = load_model(meta["model_name"], device="cpu", dtype=torch.float32)
                model = PeftModel.from_pretrained(base, latent).merge_and_unload()
            else:
                model = load_model(str(latent), device="cpu", dtype=torch.float32)
            if head and model.get_output_embeddings().weight is model.get_input_embeddings().weight:
                # A quantized head cannot share the embedding's tensor: untie it (the embedding stays
                # full precision), as converting the fake-quantized student does.
                model.get_output_embeddings().weight = torch.nn.Parameter(model.get_input_embeddings().weight.clone())
                model.config.tie_word_embeddings = False
            model.save_pretrained(tmp)
            latent = Path(tmp)
        model = AutoModelForCausalLM.from_pretrained(latent, quantization_config=config, dtype=torch.float32,
                                                     device_map=device)
        model.save_pretrained(out)
    if (run.student_dir / "tokenizer_config.json").is_file():
        for name in run.student_dir.iterdir():
            if name.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy2(name, out / name.name)
    write_json(out / "onpolicy_quant.json", {"run": run.path.name, "scheme": here, "format": meta["format"],
                                             "note": "load with transformers.AutoModelForCausalLM.from_pretrained"})
    return out
