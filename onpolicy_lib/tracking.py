"""Live training curves: the run's parameters handed to the trackers ``report_to`` names.

The HF Trainer's own integrations (TensorBoard, wandb, trackio) stream its logs and record its
arguments and the model's config; they do not know the run's :class:`~onpolicy_lib.config.TrainConfig`
(the model, the quantization, the data). :class:`RunParameters` adds it, once the integrations
have opened their runs::

    trainer = DistillTrainer(..., args=DistillConfig(..., report_to=cfg.trackers() or "none"))
    report_parameters(trainer, record_config(cfg))
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import TrainerCallback


def report_parameters(trainer: Any, parameters: dict[str, Any]) -> None:
    """Have ``trainer`` record ``parameters`` (config.json's ``train``) with every tracker it reports to."""
    if not trainer.args.report_to:
        return
    from transformers.integrations import TensorBoardCallback
    from transformers.integrations.integration_utils import default_logdir

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            # Its writer is otherwise opened by the first log, which can be the held-out evaluation before
            # training, in the working directory; here every event file of the run sits in the run directory.
            callback.logging_dir = os.path.join(trainer.args.output_dir, default_logdir())
    # Added last, so it runs after the integrations' on_train_begin has opened their runs.
    trainer.add_callback(RunParameters(parameters, trainer.callback_handler.callbacks))


class RunParameters(TrainerCallback):
    """Records ``parameters`` with the trackers among ``callbacks`` (the Trainer's, this one after them)."""

    def __init__(self, parameters: dict[str, Any], callbacks: list[TrainerCallback]) -> None:
        self.parameters = parameters
        self.callbacks = callbacks

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        if not state.is_world_process_zero:
            return
        trackers = set(args.report_to or [])
        if "tensorboard" in trackers:
            self._tensorboard()
        if "wandb" in trackers:
            import wandb

            if wandb.run is not None:
                wandb.config.update({"train_config": self.parameters}, allow_val_change=True)
        if "trackio" in trackers:
            import trackio

            trackio.config.update({"train_config": self.parameters}, allow_val_change=True)

    def _tensorboard(self) -> None:
        from transformers.integrations import TensorBoardCallback

        for callback in self.callbacks:
            writer = getattr(callback, "tb_writer", None) if isinstance(callback, TensorBoardCallback) else None
            if writer is not None:
                text = json.dumps(self.parameters, indent=2, default=str)
                writer.add_text("train_config", f"```\n{text}\n```")  # TensorBoard's text tab renders markdown
                writer.flush()
