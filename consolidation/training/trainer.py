"""The one place that drives ``transformers.Trainer``: the optimizer and one stage's run.

Each stage is an ordinary ``Trainer.train()`` run, so users keep ``report_to`` logging,
checkpoints, resume and multi-process training (``accelerate launch`` / ``torchrun``).
The optimizer is built here (AdamW, no decay on biases and norms) so that it can be
carried across stages and so the freezer can hook its steps.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from consolidation.config import TrainingConfig
from consolidation.training.checkpoints import MarkComplete, latest_complete_checkpoint
from consolidation.training.distributed import launched_world_size


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
    args = cfg.training_arguments(
        output_dir, seed=seed, progress=progress, ddp_backend="gloo" if gloo else None
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collate,
        optimizers=(optimizer, None),
        callbacks=[MarkComplete(), *(callbacks or [])],
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
