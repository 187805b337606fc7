"""What the benchmark runs with: the demo's training parameters plus the benchmark's own.

The model, data, student and GKD parameters are a :class:`~onpolicy_lib.config.TrainConfig`,
so the benchmark measures the step the demo trains with, and moves with it when its
defaults change; only the repetitions, threads and outputs are declared here.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from onpolicy_lib import quantization
from onpolicy_lib.config import TrainConfig

DESCRIPTION = "What one distillation step costs, against its arithmetic and stock TRL."


@dataclass(frozen=True)
class TrainParameter:
    """A ``TrainConfig`` field as the benchmark names it: its command-line flag and its key in the results."""

    name: str  # flag --name-with-dashes, and the key under "settings" in the results
    config_field: str  # the TrainConfig field
    flag_type: type | None = None  # None: not a command-line flag (the demo's value is always used)
    help: str = ""  # used where the field has no ``help`` metadata of its own
    note: str = ""  # what the value means to the benchmark, appended to the help
    choices: tuple[str, ...] | None = None


TRAIN_PARAMETERS = (
    TrainParameter("model", "model_name", str, "packaged alias, hub id, local model directory or .gguf"),
    TrainParameter("dataset", "dataset_name", str, "the chat dataset", "the batch is its first chats that fit"),
    TrainParameter("quant_type", "quant_type", str, "student quantization", choices=quantization.QUANT_TYPES),
    TrainParameter("group_size", "group_size", int, "None: the model's default (128, 64 or 32)"),
    TrainParameter("batch_size", "per_device_train_batch_size", int, "chats in the batch"),
    TrainParameter("max_new_tokens", "max_new_tokens", int, "rollout length", "min = max"),
    TrainParameter("max_length", "max_length", int, "longest chat, in tokens", "filter for the batch's chats"),
    TrainParameter("min_completion_tokens", "min_completion_tokens", int, "shortest completion",
                   "filter for the batch's chats"),
    TrainParameter("beta", "beta", float, "generalized JSD: 0 = forward KL, 1 = reverse KL"),
    TrainParameter("temperature", "temperature"),
    TrainParameter("learning_rate", "learning_rate"),
    TrainParameter("device", "device", str, "auto, cpu, cuda, cuda:N", "cuda:N also accepted"),
    TrainParameter("seed", "seed", int, "seed of every student and sampling stream"),
)


@dataclass
class SpeedSettings:
    """The training parameters measured (``train``) and how the benchmark measures them."""

    train: TrainConfig = field(default_factory=TrainConfig)
    steps: int = 5  # timed steps of ours, the floor and generation
    warmup: int = 1  # untimed steps before them
    trl_steps: int = 3  # timed steps of stock TRL and fake-quant generation (slow; after at most 1 warm-up)
    threads: int | None = None  # CPU threads for torch; None: torch's own choice (one per core)
    skip_trl: bool = False
    skip_eval: bool = False
    skip_hardware: bool = False  # leave out the machine's ceilings and the decode-step block
    eval_limit: int = 20  # documents per benchmark in the evaluation block (MMLU: one per subject)
    skip_steps: bool = False  # leave out the step, floor and generation blocks (the other blocks alone)
    long_new_tokens: int = 256  # the long-rollout block's rollout length (the generation study's); 0: skip it
    long_max_length: int = 768  # and its chats' length
    long_steps: int = 1  # timed steps of each long-rollout step (no warm-up: each is tens of seconds)
    busy_core: bool = False  # only the contention block: a short lambda=0 step alone and beside a busy core
    busy_steps: int = 2  # timed steps of each contention variant (after one warm-up)
    json: str | None = None  # also write every figure to this JSON file
    report_dir: str | None = None  # also write the report and figures as speed-<cpu>-<date>.txt/.json here

    def as_dict(self) -> dict[str, Any]:
        """Flat, by the benchmark's names: the ``settings`` of the results."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "train"}
        return {**{p.name: getattr(self.train, p.config_field) for p in TRAIN_PARAMETERS}, **own}


def _help(parameter: TrainParameter) -> str:
    text = TrainConfig.help(parameter.config_field) or parameter.help
    return f"{text} ({parameter.note})" if parameter.note else text


def parser() -> argparse.ArgumentParser:
    defaults, train = SpeedSettings(), TrainConfig()
    p = argparse.ArgumentParser(prog="python -m onpolicy_lib.speed", description=DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for param in TRAIN_PARAMETERS:
        if param.flag_type is not None:
            p.add_argument(f"--{param.name.replace('_', '-')}", dest=param.name, type=param.flag_type,
                           default=getattr(train, param.config_field), choices=param.choices, help=_help(param))
    p.add_argument("--steps", type=int, default=defaults.steps, help="timed steps of ours, the floor and generation")
    p.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed steps before them")
    p.add_argument("--trl-steps", type=int, default=defaults.trl_steps,
                   help="timed steps of stock TRL and fake-quant generation (slow; after at most 1 warm-up)")
    p.add_argument("--threads", type=int, default=defaults.threads,
                   help="CPU threads for torch; None: torch's own choice (one per core)")
    p.add_argument("--skip-trl", action="store_true", help="do not time stock TRL")
    p.add_argument("--skip-eval", action="store_true", help="do not time a student's evaluation")
    p.add_argument("--skip-hardware", action="store_true",
                   help="do not measure the machine's ceilings and the decode steps against them "
                        "(they include a torch.compile of the decode step, the slowest part on a small model)")
    p.add_argument("--eval-limit", type=int, default=defaults.eval_limit,
                   help="documents per benchmark when timing a student's evaluation (MMLU: one per subject; "
                        "fidelity on 8 held-out chats, perplexity on 4096 tokens)")
    p.add_argument("--skip-steps", action="store_true",
                   help="do not time the steps, the floor and generation (run the other blocks alone)")
    p.add_argument("--long-new-tokens", type=int, default=defaults.long_new_tokens,
                   help="long-rollout block: rollout length (the generation study's); 0 leaves the block out")
    p.add_argument("--long-max-length", type=int, default=defaults.long_max_length,
                   help="long-rollout block: the longest chat, in tokens (the generation study's)")
    p.add_argument("--long-steps", type=int, default=defaults.long_steps,
                   help="long-rollout block: timed steps at lambda=0 and lambda=1 (no warm-up)")
    p.add_argument("--busy-core", action="store_true",
                   help="instead of the other blocks: a short lambda=0 step alone and beside a busy loop pinned "
                        "to one core, in fresh processes with each OpenMP wait policy and thread count")
    p.add_argument("--busy-steps", type=int, default=defaults.busy_steps,
                   help="with --busy-core: timed steps of each variant (after one warm-up)")
    p.add_argument("--json", default=defaults.json, metavar="OUT", help="also write every figure to this JSON file")
    p.add_argument("--report-dir", default=defaults.report_dir, metavar="DIR",
                   help="also write the report and its figures to DIR/speed-<cpu>-<date>.txt and .json "
                        "(e.g. outputs/benchmarks; an existing name gets a suffix, nothing is overwritten)")
    return p


def parse_args(argv: list[str] | None = None) -> SpeedSettings:
    cli = parser()
    ns = vars(cli.parse_args(argv))
    if (ns["steps"] < 1 or ns["trl_steps"] < 1 or ns["warmup"] < 0 or ns["batch_size"] < 1
            or (ns["threads"] or 1) < 1 or ns["eval_limit"] < 1 or ns["long_steps"] < 1 or ns["busy_steps"] < 1):
        cli.error("--steps, --trl-steps, --batch-size, --threads, --eval-limit, --long-steps and --busy-steps must "
                  "be >= 1, --warmup >= 0")
    if ns["long_new_tokens"] and not 1 < ns["long_new_tokens"] < ns["long_max_length"]:
        cli.error("--long-new-tokens must be 0 (no long-rollout block) or in (1, --long-max-length)")
    train = TrainConfig(**{param.config_field: ns.pop(param.name) for param in TRAIN_PARAMETERS if param.name in ns})
    return SpeedSettings(train=train, **ns)
