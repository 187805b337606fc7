"""One distillation run, top to bottom: validate, data, teacher, student, train, save.

``notebooks/train.ipynb`` calls :func:`train`; so can a script::

    import onpolicy_lib as opq
    run = opq.train(opq.TrainConfig(lmbda=1.0, max_steps=10))
    run.metrics, run.losses, run.path
"""

from __future__ import annotations

import os
import platform
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers

from onpolicy_lib import cpu_threads, data, quantization, rollouts
from onpolicy_lib.config import ConfigError, TrainConfig, portable_path
from onpolicy_lib.distill import DistillConfig, DistillTrainer, teacher_confidence
from onpolicy_lib.metrics import MetricsRecorder, machine_description, summarise
from onpolicy_lib.models import (
    load_model,
    load_skeleton,
    load_tokenizer,
    prompt_format,
    resolve_device,
    resolve_dtype,
    teacher_precision,
)
from onpolicy_lib.rundir import Run
from onpolicy_lib.student import build_student, save_student
from onpolicy_lib.tracking import report_parameters


def record_config(cfg: TrainConfig) -> dict[str, Any]:
    """The TrainConfig as config.json keeps it: paths relative to the project, as everywhere in outputs."""
    values = cfg.to_dict()
    if values["output_dir"] is not None:
        values["output_dir"] = portable_path(cfg.resolved_output_dir())
    return values


def plan(cfg: TrainConfig) -> Run:
    """Validate ``cfg`` and decide new/resume/complete for its run directory; no heavy work."""
    cfg.validate()
    return Run(cfg.resolved_output_dir()).plan(record_config(cfg))


def versions() -> dict[str, str]:
    import peft
    import torchao

    return {"python": platform.python_version(), "torch": torch.__version__, "torchao": torchao.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def fsdp_config(model: torch.nn.Module) -> dict[str, Any]:
    """TrainingArguments' ``fsdp_config`` for the student: accelerate's FSDP2, one unit per decoder layer
    (the model's ``_no_split_modules`` classes it contains) plus the root, fully sharded."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in names})
    if not layers:
        raise ConfigError(f"fsdp: {type(model).__name__} names no decoder layer class to shard by (_no_split_modules)")
    # Sharded checkpoints: each process writes its own shard (torch.distributed.checkpoint), so a
    # checkpoint never needs the whole optimizer state in one place.
    return {"version": 2, "transformer_layer_cls_to_wrap": layers, "reshard_after_forward": True,
            "state_dict_type": "SHARDED_STATE_DICT"}


def distill_args(cfg: TrainConfig, run_dir: Path, device: torch.device,
                 dtype: torch.dtype = torch.float32, cakld_gamma: float | None = None,
                 fsdp: dict[str, Any] | None = None, rollout: dict[str, Any] | None = None) -> DistillConfig:
    """The Trainer's arguments for ``cfg``; ``fsdp``: an :func:`fsdp_config` to shard the student;
    ``rollout``: the form :func:`rollout_form` settled (else ``cfg``'s rollout options, ``auto`` read as exact)."""
    sharding = {"fsdp": True, "fsdp_config": fsdp, "fast_rollouts": False} if fsdp else {}
    form = {k: (rollout or {}).get(k, getattr(cfg, k)) for k in rollouts.OPTIONS}
    return DistillConfig(
        output_dir=str(run_dir), seed=cfg.seed, data_seed=cfg.seed,
        lmbda=cfg.lmbda, beta=cfg.beta, temperature=cfg.temperature, seq_kd=cfg.seq_kd,
        max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens, disable_dropout=cfg.disable_dropout,
        **form, divergence=cfg.divergence, cakld_gamma=cakld_gamma,
        learning_rate=cfg.learning_rate, per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, max_steps=cfg.max_steps,
        warmup_steps=int(cfg.warmup_ratio * cfg.max_steps), weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps, save_steps=cfg.save_steps, save_total_limit=1,
        eval_strategy="steps" if cfg.eval_steps else "no", eval_steps=cfg.eval_steps,
        report_to=cfg.trackers() or "none", run_name=run_dir.name,
        remove_unused_columns=False, dataloader_num_workers=0,
        use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16, disable_tqdm=False, **sharding,
    )


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters of a model (a meta-device skeleton will do), in all and in its embedding/head matrices."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # tied matrices once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    embeddings = {id(m.weight): m.weight.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())
                  if m is not None}
    return {"total": total, "embeddings": sum(embeddings.values())}


def memory_estimate(counts: dict[str, int], cfg: TrainConfig, dtype: torch.dtype, shards: int = 1) -> dict[str, float]:
    """Bytes a run needs on one device before activations: the teacher in ``dtype``, the student and,
    for full fine-tuning, float32 master weights, their gradients and AdamW's two moments.

    With ``shards`` > 1 (fsdp) the student's states are divided among that many processes; the
    teacher stays whole on each. The student is built whole before it is sharded, so the total is at
    least teacher + whole float32 student.
    """
    width = torch.finfo(dtype).bits // 8
    total = counts["total"]
    if cfg.lora_r is not None:  # the frozen base in the teacher's dtype; adapters are small
        parts = {"teacher": total * width, "student": total * width}
    else:
        trainable = total - (0 if cfg.train_embeddings else counts["embeddings"])
        each = f" (1/{shards} each)" if shards > 1 else ""
        parts = {"teacher": total * width, f"student (float32 master weights){each}": total * 4 / shards,
                 f"gradients{each}": trainable * 4 / shards, f"AdamW moments{each}": trainable * 8 / shards}
    return {**parts, "total": max(sum(parts.values()), total * width + (total * 4 if cfg.lora_r is None else 0))}


def check_memory(counts: dict[str, int], cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
                 shards: int = 1) -> None:
    """Refuse, before any weights load, a run whose weights and optimizer state alone exceed the device
    (the student's states divided among ``shards`` processes under fsdp)."""
    if device.type == "cuda":
        available = torch.cuda.get_device_properties(device).total_memory
    else:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need = memory_estimate(counts, cfg, dtype, shards)
    if need["total"] > available:
        parts = " + ".join(f"{name} {value / 2**30:.1f}" for name, value in need.items() if name != "total")
        if cfg.lora_r is not None:
            hint = "use a larger device"
        elif shards > 1:
            hint = "use more processes (fsdp shards the student's states among them) or LoRA (lora_r)"
        else:
            hint = "use LoRA (lora_r) or fsdp True with several processes (accelerate launch --num_processes N)"
        raise ConfigError(f"model_name {cfg.model_name!r} does not fit {device.type}: {parts} = "
                          f"{need['total'] / 2**30:.1f} GiB before activations, {available / 2**30:.1f} GiB "
                          f"available; {hint}")


@dataclass
class Setup:
    """What a run settles before any data or weights load: its processes, device and quantization grid."""

    processes: Any  # accelerate's PartialState
    device: torch.device
    dtype: torch.dtype
    group_size: int
    scheme: dict[str, Any]
    sharded: bool  # the student's states divided among the processes (fsdp with several of them)
    previous: dict[str, Any]  # what a resumed run resolved before (its record is rewritten)

    @property
    def main(self) -> bool:
        """Only the main process writes the run directory."""
        return self.processes.is_main_process


def settle(cfg: TrainConfig, run: Run, processes: Any) -> Setup:
    """Every check that can refuse the run, before data or weights load: the baselines' environment,
    the group size against the real layer shapes, memory, kernels, and a resume's scheme and sharding."""
    if cfg.do_eval and cfg.eval_parameters.get("calibrated"):  # not found only after an hour of training
        from onpolicy_lib.calibrated_ptq import llmc_python

        llmc_python()
    # Group size against the real layer shapes, from the architecture alone: a bad value
    # fails here, naming the layer and the valid sizes, before data or weights are loaded.
    skeleton = load_skeleton(cfg.model_name)
    group_size = quantization.resolve_group_size(skeleton, cfg.group_size, cfg.quantize_head)
    skeleton_parameters = parameter_counts(skeleton)
    del skeleton

    device = resolve_device(cfg.device)
    if processes.num_processes > 1 and device.type == "cuda":
        device = processes.device  # this process's own GPU
    dtype = resolve_dtype(cfg.dtype, device)
    sharded = cfg.fsdp and processes.num_processes > 1  # one process: nothing to shard across
    check_memory(skeleton_parameters, cfg, device, dtype, processes.num_processes if sharded else 1)
    quantization.check_kernels(cfg.quant_type, device, group_size)
    scheme = quantization.describe_scheme(cfg.quant_type, group_size, device, cfg.quantize_head)
    previous = (run.recorded.get("resolved") or {}) if run.state == "resume" else {}
    if run.state == "resume":  # a CPU run must not go on as a GPU run on another grid, or vice versa
        quantization.check_same_scheme(previous.get("scheme"), scheme, f"resuming {portable_path(run.path)}")
        if run.checkpoint and any(run.checkpoint.glob("pytorch_model_fsdp*")) != sharded:
            # The Trainer reads a sharded checkpoint only into a sharded model, and a whole one only into a whole one.
            raise ConfigError(f"resuming {portable_path(run.path)}: {run.checkpoint.name} was written "
                              f"{'with' if not sharded else 'without'} the student sharded; run it as it was "
                              f"(fsdp {not sharded}{' with several processes' if not sharded else ''})")
    return Setup(processes, device, dtype, group_size, scheme, sharded, previous)


def training_data(cfg: TrainConfig, tokenizer: Any, main: bool) -> tuple[data.PreparedData, datasets.Dataset]:
    """The prepared (filtered, tokenized) chats and the held-out sample scored before and after training."""
    datasets.disable_progress_bars()  # seconds of work; the bars would flood rendered notebooks
    prepared = data.prepare_distillation_data(cfg.dataset_name, tokenizer, cfg.max_length, cfg.min_completion_tokens)
    if main:
        print(prepared.describe(portable_path(prepared.path)))
    if len(prepared.train) == 0:
        raise ValueError(f"dataset_name {cfg.dataset_name!r}: no example survives filtering at "
                         f"max_length={cfg.max_length}, min_completion_tokens={cfg.min_completion_tokens}: "
                         f"{prepared.counts['train']}")
    return prepared, data.stratified_sample(prepared.heldout, cfg.heldout_eval_size)


def resolved_record(setup: Setup, tokenizer: Any, prepared: data.PreparedData, heldout_set: datasets.Dataset,
                    student: torch.nn.Module, error: float) -> dict[str, Any]:
    """The run record's ``resolved`` part: what the run's parameters came to on this machine and data."""
    return {"group_size": setup.group_size, "dtype": str(setup.dtype), "scheme": setup.scheme,
            "prompt_format": prompt_format(tokenizer),
            "prepared_data": portable_path(prepared.path),
            "weight_error_vs_teacher": round(error, 6),
            "train_examples": len(prepared.train), "heldout_eval_examples": len(heldout_set),
            "heldout_sources": dict(sorted(Counter(heldout_set["source"]).items()))
            if "source" in heldout_set.column_names else {},
            "trainable_parameters": sum(p.numel() for p in student.parameters() if p.requires_grad),
            "sharded": setup.sharded,
            "quantization": quantization.quantization_summary(student)}


def cakld_confidence(cfg: TrainConfig, setup: Setup, teacher: torch.nn.Module, train_set: datasets.Dataset,
                     pad_token_id: int) -> dict[str, Any]:
    """The teacher's mean confidence that weights cakld's two KLs: measured once per run (a resumed run
    reads what it recorded)."""
    confidence = setup.previous.get("cakld_confidence") or teacher_confidence(
        teacher, train_set, pad_token_id, cfg.cakld_confidence_chats)
    if setup.main:
        print(f"cakld: the teacher's mean confidence on {confidence['chats']} training chats "
              f"({confidence['tokens']} tokens) is {confidence['gamma']:.4f}")
    return confidence


def rollout_form(cfg: TrainConfig, setup: Setup, teacher: torch.nn.Module, student: torch.nn.Module,
                 train_set: datasets.Dataset, run: Run) -> dict[str, Any]:
    """How the student samples its rollouts (config.json's ``resolved.rollout``): a resumed run's recorded
    form; else :func:`onpolicy_lib.rollouts.settle`'s (``auto`` measured on this machine at the run's batch
    and a typical batch's prompt width, cached; explicit values forced). Several processes take the main one's."""
    if setup.previous.get("rollout"):
        return setup.previous["rollout"]
    if setup.previous:  # resuming a run recorded before auto: the form its options named (exact when absent)
        form = rollouts.RolloutForm.from_settings({**rollouts.EXACT_SETTINGS,
                                                   **run.recorded.get("train", run.recorded)})
        return {**form.settings(), "form": form.key, "why": "resumed a run recorded before auto"}
    chosen = None
    if setup.main:
        lengths = sorted(len(ids) for ids in train_set["prompt_ids"]) or [1]
        # A left-padded batch is as wide as its longest prompt: about this quantile of the prompts.
        rows = cfg.per_device_train_batch_size
        width = lengths[min(len(lengths) - 1, len(lengths) * rows // (rows + 1))]
        chosen = rollouts.settle(cfg, student, teacher, width, machine_description(setup.device), setup.device)
        if chosen.get("cache"):
            chosen["cache"] = portable_path(chosen["cache"])  # config.json never records this machine's paths
        measured = ", ".join(f"{k} {v['decode_step_s'] * 1e3:.0f} ms" for k, v in chosen.get("measured", {}).items())
        print(f"rollouts: {chosen['form']} ({chosen['why']}{'; decode step ' + measured if measured else ''})")
    if setup.processes.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        chosen = broadcast_object_list([chosen])[0]
    return chosen


def heldout_before(trainer: DistillTrainer, run: Run, student: torch.nn.Module, main: bool) -> dict[str, float]:
    """The held-out divergence before training: measured once and kept, so a resumed run still
    reports the untrained starting point."""
    if run.eval_before is not None:
        return run.eval_before
    eval_before = trainer.evaluate(metric_key_prefix="heldout")  # every process: a collective
    if main:
        run.write_eval_before(eval_before)
    # Evaluating marks the (unwrapped) model as prepared by accelerate, and train() would then
    # not wrap it for DDP: several processes would train unsynchronised copies. (A sharded
    # student is sharded by then, in place; train() does not shard it twice.)
    vars(student).pop("_is_accelerate_prepared", None)
    return eval_before


def train(cfg: TrainConfig) -> Run:
    """Run (or resume, or reuse) the distillation run that ``cfg`` describes; returns its :class:`Run`.

    Stages: plan the run directory, settle the setup (every check that can refuse), record, data,
    teacher and student, trainer, train, save. Under ``accelerate launch --num_processes N`` every
    process runs this: the HF Trainer makes it data-parallel (DDP), each process on its own device,
    and only the main process writes the run directory (records, log, student, metrics); the others
    wait for it where they read what it wrote. With ``cfg.fsdp`` (full fine-tuning) the student is
    sharded across the processes instead (FSDP2 through accelerate) and gathered whole to be saved;
    the teacher, inference only, stays whole on each.
    """
    from accelerate import PartialState

    # Sets up the process group when launched by accelerate (gloo for CPU processes).
    processes = PartialState(cpu=resolve_device(cfg.device).type == "cpu")
    if resolve_device(cfg.device).type == "cpu":
        cpu_threads.configure_threads()  # the cores this process can use now (recorded in config.json's machine)
    run = plan(cfg)
    processes.wait_for_everyone()  # every process decided new/resume/complete before anything is written
    if processes.is_main_process:
        print(run.describe())
    if run.state == "complete":
        return run

    setup = settle(cfg, run, processes)
    main = setup.main
    record: dict[str, Any] = {"train": record_config(cfg), "versions": versions(), "device": str(setup.device),
                              "machine": machine_description(setup.device),
                              "teacher": teacher_precision(cfg.model_name), "processes": processes.num_processes}
    if main:
        run.write_record(record)  # claims the directory before the slow part

    tokenizer = load_tokenizer(cfg.model_name)
    prepared, heldout_set = training_data(cfg, tokenizer, main)
    train_set = prepared.train

    transformers.set_seed(cfg.seed)  # LoRA initialisation and everything after it
    teacher = load_model(cfg.model_name, device=setup.device, dtype=setup.dtype)
    error = quantization.check_distinct_from_teacher(teacher, cfg.quant_type, setup.group_size, cfg.quantize_head)
    student = build_student(teacher, cfg.quant_type, setup.group_size, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                            quantize_head=cfg.quantize_head, train_embeddings=cfg.train_embeddings)
    record["resolved"] = resolved_record(setup, tokenizer, prepared, heldout_set, student, error)
    record["filter_counts"] = {"train": prepared.counts["train"], "heldout": prepared.counts["heldout"]}
    cakld_gamma = None
    if cfg.divergence == "cakld":
        record["resolved"]["cakld_confidence"] = confidence = cakld_confidence(
            cfg, setup, teacher, train_set, tokenizer.pad_token_id)
        cakld_gamma = confidence["gamma"]
    record["resolved"]["rollout"] = rollout = rollout_form(cfg, setup, teacher, student, train_set, run)
    if main:
        run.write_record(record)

    recorder = MetricsRecorder(run)
    if setup.sharded and main:
        print(f"fsdp: the student's weights, gradients and optimizer state are sharded across "
              f"{processes.num_processes} processes; the teacher stays whole on each")
    args = distill_args(cfg, run.path, setup.device, setup.dtype, cakld_gamma,
                        fsdp_config(student) if setup.sharded else None, rollout)
    trainer = DistillTrainer(student, teacher, args, processing_class=tokenizer,
                             train_dataset=train_set, eval_dataset=heldout_set, callbacks=[recorder])
    report_parameters(trainer, record["train"])  # the run's parameters on report_to's live trackers
    eval_before = heldout_before(trainer, run, student, main)
    trainer.train(resume_from_checkpoint=str(run.checkpoint) if run.checkpoint else None)
    eval_after = trainer.evaluate(metric_key_prefix="heldout")
    unlogged = trainer.unlogged_stats()  # a collective too
    whole = trainer.full_state_dict()  # a collective: a sharded student gathered on the main process
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in trainer.model.parameters())
    if not main:
        processes.wait_for_everyone()
        return run

    save_student(trainer.model, run.path, cfg.model_name, cfg.quant_type, setup.group_size, tokenizer, setup.scheme,
                 state_dict=whole)
    for checkpoint in run.checkpoints():
        shutil.rmtree(checkpoint)  # optimizer state is only needed to resume; the student is saved
    metrics = summarise(recorder, unlogged, setup.device, {
        "heldout_loss_before": eval_before["heldout_loss"], "heldout_loss_after": eval_after["heldout_loss"],
        "heldout_curve": [{"step": 0, "loss": eval_before["heldout_loss"]}, *run.eval_log()],
        "heldout_examples": len(heldout_set), "train_examples": len(train_set), "group_size": setup.group_size,
        "resumed_from": run.checkpoint.name if run.checkpoint else None,
        # The student's parameters this process held while training: all of them unless sharded.
        "student_parameters_held": held,
    })
    run.write_metrics(metrics)  # written last: its presence marks the run complete
    processes.wait_for_everyone()
    return run


def parameter_value(text: str) -> Any:
    """A ``-p NAME VALUE`` value as papermill's ``-p`` reads it (``None``/``True``/``False``, numbers,
    text), and as YAML beyond that (``null``, lists, mappings)."""
    import yaml

    if text == "None":  # papermill's spelling; YAML would read it as text
        return None
    value = yaml.safe_load(text)
    if isinstance(value, str):  # YAML reads 1e-3 (no dot) as text; papermill's -p reads it as a number
        try:
            value = float(text)
        except ValueError:
            pass
    return value


def main(argv: list[str] | None = None) -> None:
    """``python -m onpolicy_lib.training [-f PRESET.yaml] [-p NAME VALUE]...``: one run from the command line.

    The same parameters as ``train.ipynb`` and the same way of giving them (papermill's ``-f``/``-p``),
    for ``accelerate launch --num_processes N -m onpolicy_lib.training ...`` (the notebook stays the
    interactive front end; it runs one process).
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m onpolicy_lib.training", description=main.__doc__.split("\n")[0])
    parser.add_argument("-f", "--parameters-file", action="append", default=[], help="a YAML preset (repeatable)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="one train.ipynb parameter (value read as papermill's -p reads it: None, True, "
                             "numbers; YAML beyond that)")
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for path in args.parameters_file:
        from onpolicy_lib.config import load_preset

        values.update(load_preset(path))
    for name, text in args.parameter:
        values[name] = parameter_value(text)
    cfg = TrainConfig.from_dict(values)
    run = train(cfg)
    from accelerate import PartialState

    if cfg.do_eval and PartialState().is_main_process:  # what train.ipynb does with do_eval
        from onpolicy_lib.evaluate import run_eval_notebook

        run_eval_notebook(run.path, **cfg.eval_parameters)


if __name__ == "__main__":
    main()
