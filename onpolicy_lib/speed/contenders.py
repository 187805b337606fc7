"""What is timed: one fixed batch, the floor, our trainer's step, stock TRL's step and generation.

Every contender gets the same teacher, a fresh copy of the same student and the same batch
(in TRL's layout for TRL), and its steps are driven by one function,
:func:`optimisation_step`, so the comparison is of the trainers' ``training_step`` alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from onpolicy_lib import data, quantization
from onpolicy_lib.batches import IGNORE_INDEX, DistillCollator, completion_forward
from onpolicy_lib.config import TrainConfig
from onpolicy_lib.distill import DistillConfig, DistillTrainer
from onpolicy_lib.models import load_model, load_tokenizer
from onpolicy_lib.rollouts import packed_available
from onpolicy_lib.speed.settings import SpeedSettings
from onpolicy_lib.speed.timing import Timing, sync, timed


# ---------------------------------------------------------------------------- the batch
def fixed_batch(tokenizer: Any, dataset_name: str, batch_size: int, max_length: int,
                min_completion_tokens: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The first ``batch_size`` training chats that survive the usual filters: token features and chats.

    Deterministic (the mixture's order is a fixed hash of document ids), so every run of the
    benchmark, and every contender within a run, sees the same real prompts and completions.
    """
    train, _ = data.load_chat_dataset(dataset_name)
    # Tokenize a growing prefix rather than the whole dataset: a few rows are enough.
    size = min(len(train), 16 * batch_size)
    while True:
        tokenized, _ = data.tokenize_for_distillation(train.select(range(size)), tokenizer, max_length,
                                                      min_completion_tokens)
        if len(tokenized) >= batch_size or size == len(train):
            break
        size = min(len(train), 4 * size)
    if len(tokenized) < batch_size:
        raise ValueError(f"dataset {dataset_name!r}: only {len(tokenized)} chats fit max_length={max_length} "
                         f"with min_completion_tokens={min_completion_tokens}; need batch_size={batch_size}")
    rows = [tokenized[i] for i in range(batch_size)]
    by_id = {row["id"]: row for row in train.select(range(size))}
    chats = [by_id[row["id"]] for row in rows]
    features = [{"prompt_ids": list(r["prompt_ids"]), "completion_ids": list(r["completion_ids"])} for r in rows]
    return features, chats


def trl_batch(features: list[dict[str, Any]], tokenizer: Any, max_length: int) -> dict[str, torch.Tensor]:
    """The same examples in the layout TRL's GKD collator (``DataCollatorForChatML``) produces.

    Built by that collator itself from the token ids, so both trainers see the same tokens.
    """
    from trl.experimental.utils import DataCollatorForChatML

    collate = DataCollatorForChatML(tokenizer=tokenizer, max_length=max_length)
    examples = [{"input_ids": f["prompt_ids"] + f["completion_ids"], "prompt": "",
                 "completion_mask": [0] * len(f["prompt_ids"]) + [1] * len(f["completion_ids"])}
                for f in features]
    return collate(examples)


@dataclass
class Setup:
    """What every block of the benchmark starts from: the model, its student's group size and the fixed batch."""

    tokenizer: Any
    teacher: torch.nn.Module  # frozen, in eval mode
    group_size: int
    features: list[dict[str, Any]]
    chats: list[dict[str, Any]]
    batch: dict[str, torch.Tensor]  # the features collated on the device


def load_setup(cfg: TrainConfig, device: torch.device) -> Setup:
    """The benchmark's model and fixed batch for ``cfg`` on ``device``."""
    tokenizer = load_tokenizer(cfg.model_name)
    teacher = load_model(cfg.model_name, device=device).eval().requires_grad_(False)
    features, chats = fixed_batch(tokenizer, cfg.dataset_name, cfg.per_device_train_batch_size, cfg.max_length,
                                  cfg.min_completion_tokens)
    return Setup(tokenizer, teacher, quantization.resolve_group_size(teacher, cfg.group_size), features, chats,
                 to_device(DistillCollator(tokenizer.pad_token_id)(features), device))


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------- steps
def floor_step(student: torch.nn.Module, teacher: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """The arithmetic of a step: student forward+backward and teacher forward on ``batch``, nothing else."""
    forward = completion_forward(batch)  # exactly the forward our loss runs
    student.zero_grad(set_to_none=True)
    # Any scalar of the logits gives the full backward pass; its value is irrelevant.
    student(**forward).logits.float().mean().backward()
    with torch.inference_mode():
        teacher(**forward)


def optimisation_step(trainer: Any, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    """One full step as the Trainer's loop runs it: training_step, clip, optimizer, schedule, zero_grad.

    The same driver for both trainers, so the comparison is of their ``training_step`` alone.
    """
    model = trainer.model
    start = time.perf_counter()
    trainer.training_step(model, dict(batch))  # TRL rewrites its inputs dict in place
    sync(device)
    middle = time.perf_counter()
    if trainer.args.max_grad_norm and trainer.args.max_grad_norm > 0:
        trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    model.zero_grad()
    trainer.state.global_step += 1
    sync(device)
    return {"training_step": middle - start, "optimizer": time.perf_counter() - middle}


# ---------------------------------------------------------------------------- trainers
def _common_args(cfg: TrainConfig, device: torch.device, out: str, lmbda: float) -> dict[str, Any]:
    # The arguments both trainers share, with the demo's values.
    return dict(output_dir=out, per_device_train_batch_size=cfg.per_device_train_batch_size,
                learning_rate=cfg.learning_rate, lmbda=lmbda, beta=cfg.beta, temperature=cfg.temperature,
                max_new_tokens=cfg.max_new_tokens, max_steps=10_000, report_to=[], save_strategy="no",
                disable_tqdm=True, seed=cfg.seed, use_cpu=device.type == "cpu", bf16=device.type == "cuda",
                remove_unused_columns=False)


def our_trainer(student: torch.nn.Module, teacher: torch.nn.Module, tokenizer: Any, cfg: TrainConfig,
                device: torch.device, out: str, lmbda: float, **opt_in: Any) -> DistillTrainer:
    """Our trainer on the benchmark's settings; ``opt_in``: DistillConfig fields set otherwise."""
    # min_new_tokens = max: at lambda=1 every contender generates, and scores, the same number of tokens.
    args = DistillConfig(**{**_common_args(cfg, device, out, lmbda), "min_new_tokens": cfg.max_new_tokens,
                            **opt_in})
    trainer = DistillTrainer(student, teacher, args, processing_class=tokenizer)
    _ready(trainer)
    return trainer


def trl_trainer(student: torch.nn.Module, teacher: torch.nn.Module, tokenizer: Any, cfg: TrainConfig,
                device: torch.device, out: str, lmbda: float, chats: list[dict[str, Any]],
                gradient_checkpointing: bool | None = None) -> Any:
    """Stock ``trl.experimental.gkd.GKDTrainer``, set up the documented way, same settings as ours.

    ``gradient_checkpointing=None`` keeps TRL's default (on, for ``SFTConfig`` and so ``GKDConfig``);
    with it, TRL also generates without a KV cache.
    """
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    extra = {} if gradient_checkpointing is None else {"gradient_checkpointing": gradient_checkpointing}
    args = GKDConfig(**_common_args(cfg, device, out, lmbda), max_length=cfg.max_length, **extra)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"messages": c["messages"]} for c in chats]))
    # Equal work at lambda=1: exactly max_new_tokens per row, as in our contender.
    trainer.generation_config.min_new_tokens = cfg.max_new_tokens
    trainer.generation_kwargs["min_new_tokens"] = cfg.max_new_tokens
    _ready(trainer)
    return trainer


def _ready(trainer: Any) -> None:
    # What Trainer.train does before its loop, which optimisation_step stands in for. Preparing the model is
    # where accelerate wraps its forward in autocast for a bf16 run (the Trainer adds none of its own):
    # without it the student of a "bf16" step would compute in fp32.
    trainer.model = trainer.model_wrapped = trainer.accelerator.prepare_model(trainer.model)
    trainer.create_optimizer_and_scheduler(num_training_steps=trainer.args.max_steps)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()


def _labels_of(result: Any) -> torch.Tensor:
    # Ours returns the rebuilt batch; TRL's ``generate_on_policy_outputs`` (ids, attention mask, labels).
    return result["labels"] if isinstance(result, dict) else result[2]


def watch_rollouts(trainer: Any, attr: str) -> list[tuple[float, int]]:
    """Wrap ``trainer.<attr>`` (its rollout function) to record each call's seconds and scored tokens."""
    calls: list[tuple[float, int]] = []
    inner = getattr(trainer, attr)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = inner(*args, **kwargs)
        calls.append((time.perf_counter() - start, int((_labels_of(result) != IGNORE_INDEX).sum())))
        return result

    setattr(trainer, attr, wrapper)
    return calls


def run_trainer(trainer: Any, batch: dict[str, torch.Tensor], steps: int, warmup: int, device: torch.device,
                rollout_attr: str, label: str) -> Timing:
    """Time full optimisation steps; parts: rollout seconds and the completion tokens the loss scored."""
    rollouts = watch_rollouts(trainer, rollout_attr)
    dataset_tokens = int((batch["labels"] != IGNORE_INDEX).sum())

    def step() -> dict[str, float]:
        before = len(rollouts)
        parts = optimisation_step(trainer, batch, device)
        mine = rollouts[before:]
        parts["rollout"] = sum(seconds for seconds, _ in mine)
        # Equal work check: at lambda=1 every contender scores batch x max_new_tokens tokens.
        parts["scored_tokens"] = mine[-1][1] if mine else dataset_tokens
        return parts

    return timed(step, steps, warmup, device, label)


# ---------------------------------------------------------------------------- generation and the floor
def time_generation(trainer: DistillTrainer, teacher: torch.nn.Module, batch: dict[str, torch.Tensor],
                    s: SpeedSettings, device: torch.device) -> dict[str, Timing]:
    """Rollouts through ``DistillTrainer.rollout`` (sampling, KV cache, masks) from each kind of weights."""
    def rollout_of(model: torch.nn.Module) -> Callable[[], None]:
        def call() -> None:
            trainer.rollout(model, batch)

        return call

    student = trainer.model
    timings = {"gen_plain": timed(rollout_of(teacher), s.steps, s.warmup, device, "plain weights")}
    # In an on-policy step the weights were quantized once on entry (shared with the training
    # forward); that one-off pass is timed on its own line.
    with torch.no_grad():
        timings["quantize_once"] = timed(lambda: _enter_and_leave(trainer, student), s.steps, s.warmup, device,
                                         "quantize all weights once")
        with trainer.shared_weights(student):
            timings["gen_student"] = timed(rollout_of(student), s.steps, s.warmup, device,
                                           "student, quantized once per step")
        trainer.args.rollout_dtype = "bfloat16"  # the opt-in: the same weights cast once per rollout
        with trainer.shared_weights(student):
            timings["gen_student_bf16"] = timed(rollout_of(student), s.steps, s.warmup, device,
                                                "student, quantized once per step, bf16 rollout")
        trainer.args.rollout_dtype = "float32"
        trainer.args.rollout_matmul = "weight_major"  # the opt-in: decode steps' products by W @ x^T
        with trainer.shared_weights(student):
            timings["gen_student_wm"] = timed(rollout_of(student), s.steps, s.warmup, device,
                                              "student, quantized once per step, weight-major decode")
        if packed_available():
            trainer.args.rollout_matmul = "packed"  # weights reordered once per rollout for oneDNN
            with trainer.shared_weights(student):
                timings["gen_student_pk"] = timed(rollout_of(student), s.steps, s.warmup, device,
                                                  "student, quantized once per step, packed decode")
        # The opt-in compiled decode step (weight-major inside): compiled at the first rollout, timed apart.
        trainer.args.rollout_compile = True
        trainer.args.rollout_matmul = "weight_major"
        with trainer.shared_weights(student):
            start = time.perf_counter()
            trainer.rollout(student, batch)
            compile_s = time.perf_counter() - start
            timings["gen_student_compiled"] = timed(rollout_of(student), s.steps, s.warmup, device,
                                                    "student, quantized once per step, compiled decode")
        timings["gen_student_compiled"].parts["first_rollout_compiling"] = [compile_s]
        trainer.args.rollout_compile = False
        trainer.args.rollout_matmul = "linear"
    timings["gen_materialised"] = timed(rollout_of(student), s.steps, s.warmup, device,
                                        "student, materialised for the call")
    trainer.args.fast_rollouts = False  # the plain fake-quantized forward, as stock TRL samples
    timings["gen_fake_quant"] = timed(rollout_of(student), s.trl_steps, min(s.warmup, 1), device,
                                      "student, fake-quant")
    trainer.args.fast_rollouts = True
    return timings


def _enter_and_leave(trainer: DistillTrainer, model: torch.nn.Module) -> None:
    with trainer.shared_weights(model):
        pass


def time_floor(model: torch.nn.Module, teacher: torch.nn.Module, tokenizer: Any, s: SpeedSettings,
               device: torch.device, out: str, batch: dict[str, torch.Tensor],
               on_policy_batch: dict[str, torch.Tensor]) -> dict[str, Timing]:
    """The floor on both batch shapes, and the optimizer part of a step on its own."""
    timings = {
        "floor": timed(lambda: floor_step(model, teacher, batch), s.steps, s.warmup, device, "floor"),
        "floor_lambda1_shape": timed(lambda: floor_step(model, teacher, on_policy_batch), s.steps, s.warmup,
                                     device, "floor (lambda=1 shape)"),
    }
    # What a step adds to the floor besides the loss: clipping, AdamW and the schedule, with
    # the gradients of a real backward in place (the Trainer's optimizer, as in our step).
    trainer = our_trainer(model, teacher, tokenizer, s.train, device, out, lmbda=0.0)
    floor_step(model, teacher, batch)

    def optimizer_only() -> None:
        trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()

    timings["optimizer"] = timed(optimizer_only, s.steps, s.warmup, device, "optimizer")
    return timings
