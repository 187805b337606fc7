"""Generalized knowledge distillation (GKD, Agarwal et al. 2023) on HF ``Trainer``.

A config dataclass plus a trainer, the pairing TRL uses (``GKDConfig`` /
``GKDTrainer``), and with TRL's meanings:

* ``lmbda``: each micro-batch, with this probability the completions are the
  student's own samples (on-policy); otherwise they are the dataset's
  completions (or, with ``seq_kd``, the teacher's samples).
* ``beta``: the generalized Jensen-Shannon divergence; ``beta=0`` is exactly
  forward KL(teacher || student), ``beta=1`` exactly reverse KL(student || teacher).
* ``temperature``: the sampling temperature of rollouts (as in TRL, the
  divergence itself is computed at temperature 1).

We write the step ourselves rather than subclassing TRL's ``GKDTrainer`` for
two measured reasons: its rollouts run the fake-quantized student, which
re-quantizes every weight at every generated token (several times slower than
sampling from plain weights), and its loss materialises several full-vocabulary copies of the whole padded sequence.
Ours quantizes each weight once per on-policy step and shares it between the
rollout and the training forward (:func:`fake_quantized_once`), scores only the
completion block, and computes the divergence in bounded chunks with an analytic
gradient (:func:`generalized_jsd`); each is tested equal to the straightforward
computation. ``python -m onpolicy_lib.speed`` measures the step against its
arithmetic floor and against stock TRL. Everything else (optimizer, schedule,
accumulation, checkpoints, resume, logging, progress bar) is the stock ``Trainer``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

from onpolicy_lib.batches import (
    IGNORE_INDEX,
    DistillCollator,
    completion_batch,
    completion_forward,
    eos_token_ids,
    generate_completions,
)
from onpolicy_lib.compiled_rollouts import CompiledSampler
from onpolicy_lib.compute import Shape, generation_flops, training_flops
from onpolicy_lib.config import TrainConfig
from onpolicy_lib.divergence import cakld, generalized_jsd, token_nll
from onpolicy_lib.quantization import fake_quantized_once
from onpolicy_lib.rollouts import EXACT_SETTINGS, RolloutForm, eager_form


def _gkd_field(name: str) -> Any:
    """A GKD field of :class:`TrainConfig`, with its default and help, for ``DistillConfig``."""
    declared = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    return field(default=declared.default, metadata={"help": declared.metadata["help"]})


@dataclass
class DistillConfig(TrainingArguments):
    """``TrainingArguments`` plus the GKD parameters, declared in (and defaulting as) :class:`TrainConfig`."""

    lmbda: float = _gkd_field("lmbda")
    beta: float = _gkd_field("beta")
    temperature: float = _gkd_field("temperature")
    seq_kd: bool = _gkd_field("seq_kd")
    max_new_tokens: int = _gkd_field("max_new_tokens")
    min_new_tokens: int = _gkd_field("min_new_tokens")
    disable_dropout: bool = _gkd_field("disable_dropout")
    # The trainer samples in the form these name and measures nothing: ``auto`` (settled by
    # training.train before the trainer is built, :func:`onpolicy_lib.rollouts.resolve`) reads as exact.
    rollout_dtype: str = field(default=EXACT_SETTINGS["rollout_dtype"],
                               metadata={"help": TrainConfig.help("rollout_dtype")})
    rollout_matmul: str = field(default=EXACT_SETTINGS["rollout_matmul"],
                                metadata={"help": TrainConfig.help("rollout_matmul")})
    rollout_compile: bool = field(default=EXACT_SETTINGS["rollout_compile"],
                                  metadata={"help": TrainConfig.help("rollout_compile")})
    rollout_cache_len: int | None = field(
        default=None, metadata={"help": "with rollout_compile: prompt + new tokens its static cache holds, fixed "
                                         "for the run (None: each batch's own need, rounded to a few lengths)"})
    divergence: str = _gkd_field("divergence")
    cakld_gamma: float | None = field(
        default=None, metadata={"help": "with divergence='cakld': the teacher's mean confidence (teacher_confidence)"})
    fast_rollouts: bool = field(
        default=True, metadata={"help": "sample from once-per-step materialised quantized weights (same numbers)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("lmbda", "beta"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        from onpolicy_lib.rollouts import check_options

        check_options(self.rollout_dtype, self.rollout_matmul, self.rollout_compile)
        if self.divergence == "cakld" and not (self.cakld_gamma is not None and 0.0 <= self.cakld_gamma <= 1.0):
            raise ValueError(f"divergence 'cakld' needs cakld_gamma in [0, 1] (teacher_confidence), got "
                             f"{self.cakld_gamma}")


@torch.no_grad()
def teacher_confidence(teacher: torch.nn.Module, dataset: Any, pad_token_id: int, chats: int,
                       batch_size: int = 4) -> dict[str, float | int]:
    """The teacher's mean probability of the completion tokens of the first ``chats`` training chats.

    BitDistiller's ``gamma`` for :func:`~onpolicy_lib.divergence.cakld` (a token mean, as its
    confidence is defined per token): computed once per run from the training split, and recorded.
    """
    collate = DistillCollator(pad_token_id)
    device = next(teacher.parameters()).device
    rows = [dataset[i] for i in range(min(chats, len(dataset)))]
    total, tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[start:start + batch_size]).items()}
        logits = teacher(**completion_forward(batch)).logits[:, :-1]
        targets = batch["labels"][:, batch["prompt_ids"].shape[1]:]
        mask = targets != IGNORE_INDEX
        probs = token_nll(logits, targets.clamp(min=0)).neg_().exp_()
        total += float(probs[mask].sum())
        tokens += int(mask.sum())
    return {"gamma": total / tokens if tokens else 0.0, "tokens": tokens, "chats": len(rows)}


def _row_lengths(batch: dict[str, torch.Tensor]) -> tuple[list[int], list[int]]:
    """Each row's real prompt and completion tokens (the batch layout of ``batches``)."""
    width_p = batch["prompt_ids"].shape[1]
    mask = batch["attention_mask"]
    return mask[:, :width_p].sum(1).tolist(), mask[:, width_p:].sum(1).tolist()


class DistillTrainer(Trainer):
    """Distils ``teacher_model`` into ``model`` (the quantization-aware student)."""

    args: DistillConfig

    def __init__(self, model: PreTrainedModel, teacher_model: PreTrainedModel, args: DistillConfig,
                 processing_class: PreTrainedTokenizerBase, **kwargs: Any) -> None:
        kwargs.setdefault("data_collator", DistillCollator(processing_class.pad_token_id))
        if args.disable_dropout:  # TRL's GKDConfig default: the loss forward sees the deployed policy
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        super().__init__(model=model, args=args, processing_class=processing_class, **kwargs)
        self.teacher_model = teacher_model.eval().requires_grad_(False)
        # The loss is the token mean over the whole optimizer step (every micro-batch of the
        # accumulation window), normalised in ``accumulate``, so the Trainer must neither divide
        # it by the accumulation steps nor count tokens from the dataset's labels (rollouts
        # replace them: their count is only known once they are sampled).
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = True
        self._window_tokens, self._window_loss, self._normaliser = 0, 0.0, None
        self.eos_token_ids = eos_token_ids(model, processing_class)
        self.stats = {"tokens_generated": 0, "tokens_trained": 0, "batches_on_policy": 0, "batches_seq_kd": 0,
                      "batches": 0, "rollout_seconds": 0.0, "flops": 0.0}
        # Cost counted from shapes and real tokens (onpolicy_lib.compute), comparable across machines.
        self._shape = Shape.of(model.config)
        self._log_since = dict(self.stats)
        self._micro, self._micro_step = 0, None
        self._weights_shared = False
        self._sampler: CompiledSampler | None = None  # built at the first compiled rollout

    # -- sharding (FSDP2 through accelerate)
    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if not self.args.fsdp:
            return
        from accelerate import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
        from torch.distributed.fsdp import MixedPrecisionPolicy

        state = self.accelerator.state
        if state.distributed_type == DistributedType.MULTI_CPU:
            # accelerate turns FSDP on for accelerator processes only (CPU processes silently stay DDP),
            # though torch's FSDP2 runs on CPU over gloo: lifted here, with the plugin the Trainer built,
            # so that the sharded path is the one tested on CPU. GPU processes need no lift. (Set in
            # both shared states, as accelerate does: every AcceleratorState() re-reads the partial one.)
            state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True
        if not self.is_fsdp_enabled:
            raise RuntimeError(f"fsdp was asked for but accelerate set up {state.distributed_type} instead of FSDP")
        # Gathered weights stay float32 and bf16 runs compute under autocast, as unsharded runs do: the
        # fake quantizer then sees the float32 latent weights (FSDP's bf16 parameter policy would round
        # them first) and gradients are reduced in float32.
        state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy()

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True) -> Any:
        # accelerate wraps a DDP model's forward in autocast, but not an FSDP2 model's.
        return self.accelerator.autocast() if self.is_fsdp_enabled else super().autocast_smart_context_manager()

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        if self.is_fsdp_enabled and not self.accelerator._models:
            # The held-out evaluation before training would have the Trainer prepare the model alone,
            # which accelerate refuses under FSDP2 (model and optimizer must be sharded together): shard
            # both here as train() would; train() then finds them prepared.
            self.create_optimizer()
            self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
            self.model_wrapped = self.model
        return super().evaluate(*args, **kwargs)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The student's whole state dict on the main process (on CPU) when it is sharded, else None.

        A collective: every process must call it. Unsharded students are saved as they are.
        """
        if not self.is_fsdp_enabled:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.accelerator.is_main_process:
            return None
        # Gathering copies tied parameters (a tied head) apart; tied again, save_pretrained keeps one
        # of them, as it does for the unsharded model.
        first: dict[int, str] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            if id(param) in first and name in state:
                state[name] = state[first[id(param)]]
            first.setdefault(id(param), name)
        return state

    # -- rollouts
    @property
    def rollout_form(self) -> RolloutForm:
        """The form the student's rollouts take (:mod:`onpolicy_lib.rollouts`; ``auto`` reads as exact)."""
        return RolloutForm.from_settings({k: getattr(self.args, k) for k in EXACT_SETTINGS})

    @torch.no_grad()
    def rollout(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sample completions for the batch's prompts from ``model`` and rebuild the batch around them."""
        start = time.perf_counter()
        unwrapped = self.accelerator.unwrap_model(model)
        was_training = unwrapped.training
        unwrapped.eval()  # sample from the policy as deployed: no dropout
        # Inside an on-policy step the weights are already quantized once (``fake_quantized_once``);
        # otherwise (a rollout on its own) they are materialised for the rollout's duration.
        student = unwrapped is not self.teacher_model
        # (Sharded students sample through their own forward, which gathers each layer's weights.)
        fast = self.args.fast_rollouts and student and not self._weights_shared and not self.is_fsdp_enabled
        # Under the training forward's autocast (bf16 runs), so rollouts sample the policy the loss scores.
        autocast = self.compute_loss_context_manager() if self.args.bf16 or self.args.fp16 else nullcontext()
        # The student's form (teacher rollouts stay exact): its weights' dtype, its decode products, compiled.
        form = self.rollout_form if student else RolloutForm()
        # A sharded student's forward is a collective: every process runs as many as the longest rollout.
        synced = {"synced_gpus": True} if self.is_fsdp_enabled and student else {}
        try:
            if form.compiled and not self.is_fsdp_enabled:
                with autocast:
                    batch = self.compiled_rollout(unwrapped, inputs)
            else:
                # Autocast would recast every linear weight at every generated token; cast once instead, under
                # the accelerator's autocast (also where the forward is not wrapped yet). A sharded student
                # gathers its own weights, so it keeps autocast's casts.
                cast_once = (torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
                             ) if not self.is_fsdp_enabled else None
                if cast_once is not None:
                    autocast = self.accelerator.autocast()
                with eager_form(unwrapped, RolloutForm(form.dtype, form.matmul), materialise=fast,
                                autocast_dtype=cast_once), autocast:
                    batch = generate_completions(
                        unwrapped, inputs, self.processing_class.pad_token_id, self.eos_token_ids,
                        do_sample=True, temperature=self.args.temperature, top_k=0, top_p=1.0,
                        max_new_tokens=self.args.max_new_tokens, min_new_tokens=self.args.min_new_tokens, **synced)
        finally:
            unwrapped.train(was_training)
        width_p = inputs["prompt_ids"].shape[1]
        self.stats["tokens_generated"] += int(batch["attention_mask"][:, width_p:].sum())
        self.stats["flops"] += generation_flops(self._shape, *_row_lengths(batch))
        self.stats["rollout_seconds"] += time.perf_counter() - start
        return batch

    def compiled_rollout(self, student: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:meth:`rollout` through a :class:`CompiledSampler` (``rollout_compile``): the student's rollout
        weights copied into its fixed-shape copy, then sampled with ``generate``'s rules."""
        if self._sampler is None:
            form = self.rollout_form
            self._sampler = CompiledSampler(self.teacher_model, getattr(torch, form.dtype), self.args.rollout_cache_len,
                                            linear_forward=form.linear_forward)
        self._sampler.refresh(student)  # inside an on-policy step: the step's shared quantized weights
        sequences = self._sampler.sample(
            inputs["prompt_ids"], inputs["prompt_attention_mask"], eos_token_ids=self.eos_token_ids,
            pad_token_id=self.processing_class.pad_token_id, temperature=self.args.temperature,
            max_new_tokens=self.args.max_new_tokens, min_new_tokens=self.args.min_new_tokens)
        return completion_batch(inputs, sequences, self.processing_class.pad_token_id, self.eos_token_ids)

    def on_policy_draw(self) -> float:
        # A draw keyed by (seed, step, micro-batch) rather than a running generator, so the
        # on/off-policy sequence is reproducible, untouched by other users of Python's global
        # random state, and identical after resuming from a checkpoint.
        step = self.state.global_step
        self._micro = self._micro + 1 if self._micro_step == step else 0
        self._micro_step = step
        return random.Random(f"{self.args.seed}:{step}:{self._micro}").random()

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        inputs = self._prepare_inputs(inputs)
        self.stats["batches"] += 1
        on_policy = self.on_policy_draw() < self.args.lmbda
        # Checkpointed layers recompute their forward inside backward; keep those to the plain path.
        # Sharded weights are whole only inside their layer's forward: nothing to share across it.
        share = (on_policy and self.args.fast_rollouts and not self.args.gradient_checkpointing
                 and not self.is_fsdp_enabled)
        with self.shared_weights(model) if share else nullcontext():
            if on_policy:
                inputs = self.rollout(model, inputs)
                self.stats["batches_on_policy"] += 1
            elif self.args.seq_kd:
                inputs = self.rollout(self.teacher_model, inputs)
                self.stats["batches_seq_kd"] += 1
            tokens = int((inputs["labels"] != IGNORE_INDEX).sum())
            self.stats["tokens_trained"] += tokens
            self.stats["flops"] += training_flops(self._shape, *_row_lengths(inputs))
            return self.accumulate(model, inputs, tokens)

    def accumulate(self, model: torch.nn.Module, inputs: dict[str, Any], tokens: int) -> torch.Tensor:
        """Forward and backward of one micro-batch so that the optimizer step sees the token mean of
        its whole accumulation window.

        The window's token count is known only after its last rollout, so earlier micro-batches
        backpropagate their token *sums*, and the last one first rescales the accumulated gradients
        by 1 / (window tokens), then backpropagates its own sum divided by it. Accumulation 2 x batch
        1 then equals batch 2 on the same examples (tested); with one micro-batch per step it is the
        plain token mean of the batch. (The original study's trl 0.26.2 with transformers 4.57.3 sums
        per-micro-batch token means over the window; TRL 1.16 divides by the dataset completions'
        token count, also when rollouts replaced them.)
        """
        self._window_tokens += tokens
        last = self.accelerator.sync_gradients  # the Trainer sets it for the window's last micro-batch
        normaliser, divide_after = 1.0, None
        if last:
            # Several processes: the window is every process's micro-batches, and DDP averages the
            # processes' gradients, so each divides its sums by (all tokens / processes).
            total = self._window_tokens
            if self.accelerator.num_processes > 1:
                count = torch.tensor(float(total), dtype=torch.float64, device=self.args.device)
                total = float(self.accelerator.reduce(count, reduction="sum"))
            normaliser = max(total, 1) / self.accelerator.num_processes
            if self.is_fsdp_enabled:
                # FSDP2 keeps the window's earlier gradients unreduced inside itself (param.grad is
                # unset until the last backward reduce-scatters them): every micro-batch backpropagates
                # its sum, and the reduced shards are scaled once afterwards. The same arithmetic.
                normaliser, divide_after = 1.0, normaliser
            elif self._window_tokens > tokens or self.accelerator.num_processes > 1:
                with torch.no_grad():
                    for param in model.parameters():
                        if param.grad is not None:
                            param.grad.mul_(1.0 / normaliser)
        self._normaliser = normaliser
        try:
            loss = super().training_step(model, inputs)
        finally:
            normaliser, self._normaliser = self._normaliser, None
        self._window_loss += loss * normaliser  # this micro-batch's token sum
        if not last:
            return torch.zeros_like(loss)  # the Trainer sums what steps return: the window's mean comes last
        if divide_after is not None:
            with torch.no_grad():
                for param in model.parameters():
                    if param.grad is not None:
                        param.grad.mul_(1.0 / divide_after)
            normaliser = divide_after
        mean, self._window_tokens, self._window_loss = self._window_loss / normaliser, 0, 0.0
        return mean

    @contextlib.contextmanager
    def shared_weights(self, model: torch.nn.Module) -> Iterator[None]:
        """One fake quantization of the student's weights for a whole on-policy step (rollout + training)."""
        with contextlib.ExitStack() as stack:
            # Computed under the loss's autocast context, as the training forward would compute them.
            with self.compute_loss_context_manager():
                stack.enter_context(fake_quantized_once(self.accelerator.unwrap_model(model)))
            self._weights_shared = True
            try:
                yield
            finally:
                self._weights_shared = False

    # -- the loss
    def distillation_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                          normaliser: int | None = None) -> torch.Tensor:
        """The divergence summed over the batch's scored tokens, divided by ``normaliser`` (default:
        their number: the token mean)."""
        labels = inputs["labels"]
        width_p = inputs["prompt_ids"].shape[1]
        forward = completion_forward(inputs)  # only the completion block is scored
        with torch.no_grad():
            teacher_logits = self.teacher_model(**forward).logits
        student_logits = model(**forward).logits
        mask = labels[:, width_p:] != IGNORE_INDEX
        if not mask.any():
            return student_logits.sum() * 0.0  # keeps the graph; nothing to learn from this batch
        # Scored rows of the flattened [B * keep, V] logits (position k predicts token k + 1; the
        # last position predicts nothing): the divergence reads them in place, so neither the
        # [:, :-1] slice nor a masked copy of the logits (nor their backward scatters) is built.
        rows = F.pad(mask, (0, 1)).flatten().nonzero().squeeze(1)
        if self.args.divergence == "cakld":
            values = cakld(student_logits, teacher_logits, self.args.cakld_gamma, rows=rows)
        else:
            values = generalized_jsd(student_logits, teacher_logits, self.args.beta, rows=rows)
        return values.sum() / (normaliser or len(rows))

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        loss = self.distillation_loss(model, inputs, self._normaliser)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor, None, None]:
        # Held-out evaluation: the same divergence on the dataset's completions (off-policy),
        # a low-noise signal of how close the student has come to the teacher.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            return self.distillation_loss(model, inputs).detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the counts since the previous one
            logs.update(self.unlogged_stats())
            self._log_since = dict(self.stats)
        super().log(logs, start_time)

    def unlogged_stats(self) -> dict[str, float]:
        # Deltas rather than running totals: summed over the log they give the run's
        # totals even when it was resumed from a checkpoint in a fresh process.
        since = {k: self.stats[k] - self._log_since[k] for k in self.stats}
        if self.accelerator.num_processes > 1:  # a collective: every process logs at the same steps
            counts = torch.tensor([since[k] for k in self.stats], dtype=torch.float64, device=self.args.device)
            summed = self.accelerator.reduce(counts.clone(), reduction="sum")
            slowest = self.accelerator.reduce(counts.clone(), reduction="max")
            since = {k: (float(slowest[i]) if k == "rollout_seconds" else int(summed[i]))
                     for i, k in enumerate(self.stats)}  # the rollout time is the slowest process's
        since["rollout_seconds"] = round(since["rollout_seconds"], 3)
        since["on_policy_fraction"] = since["batches_on_policy"] / max(since["batches"], 1)
        return since
