"""The one place that drives ``transformers.Trainer``: the optimizer and one stage's run.

Each stage is an ordinary ``Trainer.train()`` run, so users keep ``report_to`` logging,
checkpoints, resume and multi-process training (``accelerate launch`` / ``torchrun``,
DDP or FSDP2). The optimizer is built here (AdamW, no decay on biases and norms) so that
it can be carried across stages and so the freezer can hook its steps.

A model sharded at load time (FSDP2, :mod:`consolidation.training.sharding`) is one the
Trainer can train but not checkpoint fully (it saves the gathered weights only): its
checkpoints here also hold each process's shard of weights and optimizer moments (a
distributed checkpoint), the scheduler and every process's random state, and resuming
loads those in place of the Trainer's whole-model loading, which cannot fill shards.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from consolidation.config import TrainingConfig
from consolidation.training.checkpoints import MarkComplete, latest_complete_checkpoint
from consolidation.training.distributed import launched_world_size
from consolidation.training.sharded_state import is_sharded_model, load_sharded, save_sharded
from consolidation.training.sharding import accelerate_kept_from_wrapping
from cpi_merge.faults import pause_point

SCHEDULER_FILE = "scheduler.pt"


class StepPausePoints(TrainerCallback):
    """Fault-injection points ``<stage folder>:step-<n>`` after each step (tests only)."""

    def on_step_end(self, args, state, control, **kwargs):
        """Pause at ``stage-2:step-3`` and the like when ``CPI_PAUSE_AT`` names it."""
        pause_point(f"{Path(args.output_dir).name}:step-{state.global_step}")
        return control


class StageTrainer(Trainer):
    """The Trainer, with whole checkpoints for a model sharded at load time (see above)."""

    def save_model(self, output_dir=None, _internal_call=False):
        """Save the model; a sharded one's checkpoints skip it (the shards are enough)."""
        if _internal_call and is_sharded_model(self.model):
            # a gathered copy per checkpoint would cost a whole model of writing
            Path(output_dir or self.args.output_dir).mkdir(parents=True, exist_ok=True)
            return
        super().save_model(output_dir, _internal_call)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)  # weights (gathered) and trainer state
        if not is_sharded_model(self.model):
            return
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        save_sharded(self.model, self.optimizer, folder)
        self._save_rng_state(str(folder))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), folder / SCHEDULER_FILE)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not is_sharded_model(self.model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        # sharded: weights come with the optimizer state, once it exists (below)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None or not is_sharded_model(self.model):
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        load_sharded(self.model, self.optimizer, Path(checkpoint))
        self.lr_scheduler.load_state_dict(
            torch.load(Path(checkpoint) / SCHEDULER_FILE, weights_only=True)
        )


def build_optimizer(model: torch.nn.Module, cfg: TrainingConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on every parameter except biases and norm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "norm" in name.lower() else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.arguments["weight_decay"]},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.arguments["learning_rate"])


def run_stage(
    model: torch.nn.Module,
    dataset,
    collate,
    cfg: TrainingConfig,
    *,
    output_dir: Path,
    optimizer: torch.optim.Optimizer,
    seed: int,
    progress: bool,
    resume: bool,
    callbacks: list[TrainerCallback] | None = None,
) -> Trainer:
    """Train one stage with the Trainer; resume from its newest complete checkpoint if asked.

    Returns:
        The Trainer (its ``state.log_history`` holds the losses).
    """
    gloo = launched_world_size() > 1 and not torch.cuda.is_available()
    sharded = is_sharded_model(model)
    args = cfg.training_arguments(
        output_dir,
        seed=seed,
        progress=progress,
        ddp_backend="gloo" if gloo else None,
        sharded=sharded,
    )
    # accelerate reads its FSDP variables while the Trainer is built and while it trains
    # (gradient clipping): for the whole stage they say "not FSDP", then are restored.
    with accelerate_kept_from_wrapping() if sharded else nullcontext():
        trainer = StageTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=collate,
            optimizers=(optimizer, None),
            callbacks=[MarkComplete(), StepPausePoints(), *(callbacks or [])],
        )
        if not progress:  # quiet runs: no per-step dicts printed on stdout
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        checkpoint = latest_complete_checkpoint(output_dir) if resume else None
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    return trainer


def losses(trainer: Trainer) -> list[tuple[int, float]]:
    """(step, loss) pairs logged during a stage."""
    return [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
