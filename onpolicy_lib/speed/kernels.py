"""``python -m onpolicy_lib.speed.kernels``: CUDA int4 layer speed against bf16.

One Linear of a Qwen3-4B shape, quantized the way a CUDA ``int4`` student is (torch's own int4
kernels, ``tile_packed_to_4d``), timed against the same layer in bf16 at decode and prefill
lengths. It is what ``EvalConfig.cuda_int4_kernels`` trades: the deployed kernels' numerics
against bf16 matmuls on the weights those kernels read.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torchao.quantization import quantize_

from onpolicy_lib import quantization


def _time_us(layer: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    for _ in range(5):
        layer(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        layer(x)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats * 1000


@torch.no_grad()
def layer_speed(in_features: int, out_features: int, tokens: list[int], group_size: int = 128,
                repeats: int = 50) -> list[dict[str, float]]:
    """Microseconds per forward of the bf16 layer and of its int4 conversion, per token count."""
    dense = torch.nn.Linear(in_features, out_features, bias=False, device="cuda", dtype=torch.bfloat16)
    packed = copy.deepcopy(dense)
    quantize_(packed, quantization.base_config("int4", group_size, "cuda"))
    rows = []
    for n in tokens:
        x = torch.randn(n, in_features, device="cuda", dtype=torch.bfloat16)
        rows.append({"tokens": n, "bf16_us": _time_us(dense, x, repeats), "int4_us": _time_us(packed, x, repeats)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[2560, 9728], metavar=("IN", "OUT"),
                        help="layer shape (default: Qwen3-4B's MLP up/gate projection)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 512, 4096])
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    quantization.check_kernels("int4", "cuda", args.group_size)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; Linear {args.shape[0]} -> {args.shape[1]}, "
          f"int4 {quantization.CUDA_INT4_PACKING} g{args.group_size}")
    for row in layer_speed(*args.shape, args.tokens, args.group_size):
        print(f"tokens {row['tokens']:>5}: bf16 {row['bf16_us']:8.1f} us   int4 {row['int4_us']:8.1f} us   "
              f"int4/bf16 {row['int4_us'] / row['bf16_us']:.1f}x")


if __name__ == "__main__":
    main()
