"""Batched evaluation generation (:func:`onpolicy_lib.generation.generate_texts`) against its roofline.

For each batch size it times greedy generation of real prompts and sets generated tokens per second
against the fastest this machine could produce the same tokens in the same batches:

* a **decode step** of ``B`` rows cannot take less than the larger of reading the weights once plus
  every row's key/value cache so far at the measured memory bandwidth, and its arithmetic (the
  linear layers for ``B`` tokens, attention over each row's cache) at the measured GEMM rate; the
  cache grows by one position per step, so at batch 32 and a few hundred positions it outweighs the
  weights. A row counts only while it is generating (as if ended rows left the batch at once);
* the **prefill** of a batch cannot take less than its arithmetic (real prompt tokens, not padding)
  at the GEMM rate, or reading the weights once.

``decode_over_roofline`` is the decode steps' measured time over their bound (the figure the target is
stated in: within 2x); ``total_over_roofline`` includes the prefill. With ``ignore_eos`` (the default)
every row generates ``max_new_tokens``, so the batch size holds for the whole generation.

    python -m onpolicy_lib.speed.generation --prompts 32 --max-new-tokens 128 --batch-sizes 1 8 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from onpolicy_lib.batches import eos_token_ids
from onpolicy_lib.cpu_threads import busy_seconds
from onpolicy_lib.generation import GenerationStats, encode_prompts, generate_ids
from onpolicy_lib.speed.hardware import weight_bytes
from onpolicy_lib.speed.timing import CONTENDED_OTHERS, sync

TARGET_BATCHED_ROOFLINE = 2.0  # batched generation's decode steps over their roofline


@dataclass(frozen=True)
class ModelShape:
    """What a forward reads and computes per token, from the model's shapes."""

    weight_bytes: int  # distinct parameters (a tied head once)
    linear_params: int  # every Linear's weight, the head included (a tied head counts: it is multiplied)
    head_params: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    cache_element_bytes: int

    @property
    def kv_bytes_per_position(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.cache_element_bytes

    @property
    def attention_flops_per_position(self) -> int:
        # One query against one cached position: q.k and p.v, 2 FLOPs each per dimension, every head.
        return 4 * self.layers * self.heads * self.head_dim


def model_shape(model: torch.nn.Module) -> ModelShape:
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    dtype = next(model.parameters()).dtype
    return ModelShape(weight_bytes=weight_bytes(model), linear_params=sum(m.weight.numel() for m in linears),
                      head_params=head.weight.numel() if head is not None else 0, layers=config.num_hidden_layers,
                      heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                      cache_element_bytes=torch.tensor([], dtype=dtype).element_size())


def decode_step_bound(shape: ModelShape, rows: int, positions: int, bandwidth_gbs: float,
                      gemm_gflops: float) -> float:
    """Seconds a decode step of ``rows`` rows attending to ``positions`` cached positions in all cannot beat."""
    read = shape.weight_bytes + positions * shape.kv_bytes_per_position
    flops = 2 * rows * shape.linear_params + positions * shape.attention_flops_per_position
    return max(read / (bandwidth_gbs * 1e9), flops / (gemm_gflops * 1e9))


def prefill_bound(shape: ModelShape, prompt_lengths: Sequence[int], bandwidth_gbs: float,
                  gemm_gflops: float) -> float:
    """Seconds a prefill of these prompts (the head on each last position only) cannot beat."""
    tokens = sum(prompt_lengths)
    flops = (2 * tokens * (shape.linear_params - shape.head_params) + 2 * len(prompt_lengths) * shape.head_params
             + sum(n * (n + 1) // 2 for n in prompt_lengths) * shape.attention_flops_per_position)
    read = shape.weight_bytes + tokens * shape.kv_bytes_per_position  # the cache is written once
    return max(read / (bandwidth_gbs * 1e9), flops / (gemm_gflops * 1e9))


def generation_bounds(shape: ModelShape, batch_rows: Sequence[Sequence[tuple[int, int]]], bandwidth_gbs: float,
                      gemm_gflops: float) -> dict[str, float]:
    """Lower bounds of the prefills and decode steps of batches of ``(prompt tokens, generated tokens)`` rows.

    A row's first token comes from the prefill; decode step ``t`` feeds its token ``t`` and is taken by
    the rows that generate more than ``t + 1`` tokens, each attending to its prompt and ``t + 1`` tokens.
    """
    prefill = decode = 0.0
    steps = positions = 0
    for rows in batch_rows:
        prefill += prefill_bound(shape, [p for p, _ in rows], bandwidth_gbs, gemm_gflops)
        for t in range(max(g for _, g in rows) - 1):
            live = [(p, g) for p, g in rows if g > t + 1]
            step_positions = sum(p + t + 1 for p, _ in live)
            decode += decode_step_bound(shape, len(live), step_positions, bandwidth_gbs, gemm_gflops)
            steps += 1
            positions += step_positions
    return {"prefill_s": prefill, "decode_s": decode, "decode_steps": steps, "decode_positions": positions}


@torch.no_grad()
def _time_generate(model: torch.nn.Module, prompt_ids: list[list[int]], batch_size: int, max_new_tokens: int,
                   eos: list[int], pad: int) -> tuple[float, int]:
    """``model.generate`` (greedy) over the same length-sorted batches: seconds, and tokens up to each row's end."""
    order = sorted(range(len(prompt_ids)), key=lambda i: (-len(prompt_ids[i]), i))
    device = next(model.parameters()).device
    seconds, tokens = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = [prompt_ids[i] for i in order[start:start + batch_size]]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(batch):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        sync(device)
        begin = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=eos or None, pad_token_id=pad, use_cache=True,
                             **({"min_new_tokens": max_new_tokens} if not eos else {}))
        sync(device)
        seconds += time.perf_counter() - begin
        for row in out[:, width:].tolist():
            tokens += next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
    return seconds, tokens


def measure_generation(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Any], *,
                       batch_sizes: Sequence[int] = (1, 8, 32), max_new_tokens: int, bandwidth_gbs: float,
                       gemm_gflops: float, batches: int = 1, ignore_eos: bool = True,
                       compare_generate: bool = False, verbose: bool = True, matmul: str = "linear") -> dict[str, Any]:
    """Greedy batched generation timed at each batch size, against its roofline (see the module).

    At batch size ``b``, ``b * batches`` prompts are generated: a run of the length-sorted prompts
    around their median length (all of them if there are not as many), as the batches of a large
    length-sorted evaluation pool are (prompts of similar length). ``bandwidth_gbs`` and
    ``gemm_gflops`` are the machine's measured ceilings (for example
    :func:`onpolicy_lib.speed.hardware.ceilings`' ``read_gb_s`` and the GEMM rate of the model's
    dtype). ``ignore_eos``: every row generates ``max_new_tokens``. ``compare_generate``: also time
    ``model.generate`` on the same batches (it decodes ended rows until the batch's last one ends).
    ``matmul``: the decode steps' products (:func:`onpolicy_lib.generation.generate_texts`).
    Returns JSON-serialisable figures per batch size; prints a line for each if ``verbose``.
    """
    shape = model_shape(model)
    device = next(model.parameters()).device
    eos = [] if ignore_eos else eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = encode_prompts(tokenizer, prompts)
    figures: dict[str, Any] = {"settings": {"max_new_tokens": max_new_tokens, "batches": batches,
                                            "ignore_eos": ignore_eos, "bandwidth_gbs": bandwidth_gbs,
                                            "gemm_gflops": gemm_gflops, "dtype": str(next(model.parameters()).dtype),
                                            "threads": torch.get_num_threads(), "matmul": matmul},
                               "shape": asdict(shape), "by_batch_size": {}}
    generate_ids(model, ids[:1], max_new_tokens=4, eos_token_ids=eos, pad_token_id=pad, matmul=matmul)  # warm-up
    by_length = sorted(ids, key=len)
    for batch_size in batch_sizes:
        count = min(batch_size * batches, len(ids))
        first = max(0, min(len(ids) - count, len(ids) // 2 - count // 2))
        subset = by_length[first:first + count]
        stats = GenerationStats()
        sync(device)
        start, cpu_start, machine_start = time.perf_counter(), time.process_time(), busy_seconds()
        generate_ids(model, subset, max_new_tokens=max_new_tokens, eos_token_ids=eos, pad_token_id=pad,
                     batch_size=batch_size, stats=stats, matmul=matmul)
        sync(device)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        machine_end = busy_seconds()
        bounds = generation_bounds(shape, stats.batch_rows, bandwidth_gbs, gemm_gflops)
        decoded = stats.generated_tokens - len(subset)  # each row's first token comes from the prefill
        row = {
            "prompts": len(subset), "generated_tokens": stats.generated_tokens,
            "mean_prompt_tokens": stats.prefill_tokens / len(subset),
            "prompt_tokens_range": [len(subset[0]), len(subset[-1])],
            # Prefill positions computed, and cached positions the decode steps attended to, over the real ones.
            "prefill_padded_over_real": stats.prefill_padded / stats.prefill_tokens,
            "decode_positions_over_real": (sum(r * n for r, n in stats.steps) / bounds["decode_positions"]
                                           if bounds["decode_positions"] else None),
            "wall_s": wall, "prefill_s": stats.prefill_s, "decode_s": stats.decode_s, "compact_s": stats.compact_s,
            "tokens_per_s": stats.generated_tokens / wall,
            "decode_tokens_per_s": decoded / stats.decode_s if stats.decode_s else None,
            "roofline_decode_tokens_per_s": decoded / bounds["decode_s"] if bounds["decode_s"] else None,
            "roofline_prefill_s": bounds["prefill_s"], "roofline_decode_s": bounds["decode_s"],
            "decode_over_roofline": stats.decode_s / bounds["decode_s"] if bounds["decode_s"] else None,
            "total_over_roofline": wall / (bounds["prefill_s"] + bounds["decode_s"]),
            "cpu_share": cpu / (wall * torch.get_num_threads()) if device.type == "cpu" else None,
            # Cores' worth of CPU other processes took meanwhile: above CONTENDED_OTHERS it measures the load.
            "others_cores": (max(0.0, machine_end - machine_start - cpu) / wall
                             if device.type == "cpu" and machine_start is not None and machine_end is not None
                             else None),
        }
        if compare_generate:
            seconds, tokens = _time_generate(model, subset, batch_size, max_new_tokens, eos, pad)
            row |= {"generate_wall_s": seconds, "generate_tokens_per_s": tokens / seconds}
        figures["by_batch_size"][str(batch_size)] = row
        if verbose:
            print(format_row(batch_size, row), flush=True)
    return figures


def format_row(batch_size: int | str, row: dict[str, Any]) -> str:
    """One batch size's line of the printed report."""
    line = (f"batch {int(batch_size):>3}: {row['prompts']} prompts (mean {row['mean_prompt_tokens']:.0f} tokens), "
            f"{row['generated_tokens']} tokens in {row['wall_s']:.1f} s = {row['tokens_per_s']:.1f} tok/s; decode "
            f"{row['decode_tokens_per_s']:.1f} tok/s vs roofline {row['roofline_decode_tokens_per_s']:.1f}: "
            f"{row['decode_over_roofline']:.2f}x (target <= {TARGET_BATCHED_ROOFLINE:g}); with prefill "
            f"{row['total_over_roofline']:.2f}x")
    if row["others_cores"] is not None:
        line += f"; other processes {row['others_cores']:.2f} cores"
        line += " (contended!)" if row["others_cores"] > CONTENDED_OTHERS else ""
    if "generate_tokens_per_s" in row:
        line += f"; model.generate {row['generate_tokens_per_s']:.1f} tok/s"
    return line


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure the packaged teacher (or ``--model``) on held-out prompts of the offline mixture."""
    from onpolicy_lib import data
    from onpolicy_lib.assets import PACKAGED_MODEL
    from onpolicy_lib.metrics import machine_description
    from onpolicy_lib.models import load_model, load_tokenizer
    from onpolicy_lib.speed.hardware import ceilings
    from onpolicy_lib.speed.report import report_stem, write_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=PACKAGED_MODEL)
    parser.add_argument("--prompts", type=int, default=32, help="held-out prompts (a stratified sample)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--batches", type=int, default=1, help="batches timed at each batch size")
    parser.add_argument("--natural-ends", action="store_true", help="rows stop at their end token")
    parser.add_argument("--compare-generate", action="store_true", help="also time model.generate")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--matmul", choices=("linear", "packed"), default="linear",
                        help="the decode steps' products: F.linear or oneDNN on packed weights")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--report-dir", help="also write generation-<cpu>-<date>.txt and .json here (never "
                        "over an earlier report: a later one the same day gets -2, -3, ...)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, device=device, dtype=torch.float32).eval()
    _, heldout = data.load_chat_dataset(data.OFFLINE_MIXTURE)
    chats = [m[:-1] for m in data.stratified_sample(heldout, args.prompts)["messages"]]
    limits = ceilings(device)
    header = (f"{machine_description(device)}; {torch.get_num_threads()} threads; {args.matmul} products; "
              f"read {limits['read_gb_s']:.1f} "
              f"GB/s, GEMM fp32 {limits['gemm_fp32_gflops']:.0f} GFLOP/s")
    print(header, flush=True)
    figures = measure_generation(model, tokenizer, chats, batch_sizes=args.batch_sizes,
                                 max_new_tokens=args.max_new_tokens, bandwidth_gbs=limits["read_gb_s"],
                                 gemm_gflops=limits["gemm_fp32_gflops"], batches=args.batches,
                                 ignore_eos=not args.natural_ends, compare_generate=args.compare_generate,
                                 matmul=args.matmul)
    figures["machine"] = machine_description(device)
    figures["ceilings"] = limits
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    if args.report_dir:
        command = "python -m onpolicy_lib.speed.generation " + " ".join(argv if argv is not None else sys.argv[1:])
        text = "\n".join([command, header, *(format_row(b, row) for b, row in figures["by_batch_size"].items())])
        write_report(Path(args.report_dir), report_stem(figures["machine"], kind="generation"), figures, text)
    return figures


if __name__ == "__main__":
    main()
