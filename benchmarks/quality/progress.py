"""Quiet progress bars for the demo: one bar with an ETA per training stage, no log lines.

With ``progress=True`` the product's stages show the ``transformers`` Trainer's own bar,
which also writes every logged dict (loss, learning rate, run time) under it. The Trainer
picks its bar class from ``transformers.trainer.DEFAULT_PROGRESS_CALLBACK`` (how
``transformers`` itself switches to notebook bars); :func:`quiet_trainer_bars` puts a
subclass there that keeps the bar, names it, and drops the log lines, and restores the
original on exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers.trainer_callback import ProgressCallback


class QuietProgress(ProgressCallback):
    """The Trainer's progress bar (steps, rate, ETA), named after the stage, without logs."""

    def on_train_begin(self, args, state, control, **kwargs):
        """Open the bar, labelled with the stage's folder name (task or stage)."""
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            label = Path(args.output_dir).name.removesuffix(".checkpoints")
            self.training_bar.set_description(f"    {label}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Drop the logged dicts (the reports keep the losses)."""


@contextmanager
def quiet_trainer_bars() -> Iterator[None]:
    """Within the block, every Trainer shows :class:`QuietProgress` (when it shows a bar)."""
    import transformers.trainer as trainer_module

    original = trainer_module.DEFAULT_PROGRESS_CALLBACK
    trainer_module.DEFAULT_PROGRESS_CALLBACK = QuietProgress
    try:
        yield
    finally:
        trainer_module.DEFAULT_PROGRESS_CALLBACK = original
