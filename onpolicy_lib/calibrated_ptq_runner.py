"""GPTQ / AWQ with llmcompressor, run in its own environment (``make baselines-env``).

llmcompressor pins transformers and compressed-tensors versions this project does not use, so this
file imports nothing from ``onpolicy_lib`` and is run by path with that environment's Python by
:mod:`onpolicy_lib.calibrated_ptq`, which prepares the calibration set and evaluates the result.

It quantizes ``--model`` with ``--method`` (GPTQ; or AWQ's smoothing followed by round-to-nearest, the
form llmcompressor 0.14 gives AWQ) onto the student's grid (bits, symmetry, group size, head policy),
or with ``--preset`` onto one of llmcompressor's named schemes as the original study's recipes did, and
writes a plain transformers checkpoint whose Linear weights are the quantized values themselves
(dequantized, on the grid, no ``quantization_config``): any transformers loads it, and it computes
exactly what the compressed-tensors forward computes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch


def _recipe(method: str, bits: int, group_size: int, symmetric: bool, quantize_head: bool,
            duo_scaling: bool | str = True, preset: str | None = None) -> list:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    ignore = [] if quantize_head else ["lm_head"]
    if preset:  # one of llmcompressor's named schemes, exactly as the original study wrote its recipes
        grid = {"targets": ["Linear"], "scheme": preset, "ignore": ignore}
    else:
        grid = {"config_groups": {"group_0": QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size))},
            "ignore": ignore}
    if method == "gptq":
        return [GPTQModifier(**grid)]
    return [AWQModifier(duo_scaling=duo_scaling), QuantizationModifier(**grid)]


def _duo_scaling(value: str) -> bool | str:
    return {"true": True, "false": False, "both": "both"}[value]


def _cpu_awq_workaround() -> None:
    # llmcompressor 0.14.0.1's AWQ pins its activation cache unconditionally, which raises without an
    # accelerator; pinning only speeds host-to-device copies, so skipping it on CPU changes nothing else.
    if not torch.accelerator.is_available():
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def bake(dense_dir: Path, out_dir: Path, bits: int) -> int:
    """Copy a dense compressed-tensors checkpoint to ``out_dir`` with each quantized weight replaced by
    ``(clamp(round(w / s + zp), qmin, qmax) - zp) * s`` (what its forward computes) and the scales,
    zero points and ``quantization_config`` dropped. Returns the number of weights baked."""
    from safetensors.torch import load_file, save_file
    from transformers.utils import CONFIG_NAME

    shutil.copytree(dense_dir, out_dir, dirs_exist_ok=True)
    config = json.loads((out_dir / CONFIG_NAME).read_text())
    config.pop("quantization_config", None)
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    baked = 0
    for shard in sorted(dense_dir.glob("*.safetensors")):
        tensors = load_file(shard)
        out = {}
        for name, value in tensors.items():
            if name.endswith(("_scale", "_zero_point", "_g_idx")):
                continue
            if name + "_scale" in tensors:
                scale = tensors[name + "_scale"].float()
                zero = tensors.get(name + "_zero_point")
                zero = torch.zeros_like(scale) if zero is None else zero.float()
                rows, cols = value.shape
                grouped = value.float().view(rows, scale.shape[1], -1)
                q = torch.clamp(torch.round(grouped / scale[..., None] + zero[..., None]), qmin, qmax)
                value = ((q - zero[..., None]) * scale[..., None]).view(rows, cols).to(value.dtype)
                baked += 1
            out[name] = value.contiguous()
        save_file(out, out_dir / shard.name, metadata={"format": "pt"})
    return baked


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="transformers model directory or hub id")
    parser.add_argument("--calibration", required=True, help="datasets save_to_disk dir with input_ids")
    parser.add_argument("--method", choices=("gptq", "awq"), required=True)
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--group-size", type=int, required=True)
    parser.add_argument("--asymmetric", action="store_true")
    parser.add_argument("--quantize-head", action="store_true")
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--duo-scaling", type=_duo_scaling, default=True, help="AWQ: true, false or both")
    parser.add_argument("--preset", help="an llmcompressor scheme name (W4A16, W4A16_ASYM) instead of the grid")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from datasets import load_from_disk
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _cpu_awq_workaround()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    calibration = load_from_disk(args.calibration)
    start = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=calibration,
            recipe=_recipe(args.method, args.bits, args.group_size, not args.asymmetric, args.quantize_head,
                           args.duo_scaling, args.preset),
            num_calibration_samples=len(calibration), max_seq_length=args.max_length)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as dense:
        model.save_pretrained(dense, save_compressed=False)
        tokenizer.save_pretrained(out)
        baked = bake(Path(dense), out, args.bits)
    import llmcompressor

    (out / "calibrated.json").write_text(json.dumps({
        "method": args.method, "bits": args.bits, "group_size": args.group_size,
        "symmetric": not args.asymmetric, "quantize_head": args.quantize_head,
        "duo_scaling": args.duo_scaling if args.method == "awq" else None, "preset": args.preset,
        "calibration_samples": len(calibration), "max_length": args.max_length, "baked_weights": baked,
        "oneshot_seconds": round(seconds, 1), "llmcompressor": llmcompressor.__version__,
        "torch": torch.__version__}, indent=2))
    print(f"{args.method}: {baked} weights quantized in {seconds:.1f} s -> {out}")


if __name__ == "__main__":
    main()
