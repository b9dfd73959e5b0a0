"""The one place that touches ``transformers.Trainer``: arguments, optimizer, checkpoints.

Each stage is an ordinary ``Trainer.train()`` run, so users keep ``report_to`` logging,
checkpoints, resume and multi-process training (``accelerate launch`` / ``torchrun``).
The optimizer is built here (AdamW, no decay on biases and norms) so that it can be
carried across stages and so the freezer can hook its steps.

Checkpoints: the Trainer writes ``checkpoint-N`` folders non-atomically, so a completion
marker is written after every rank has finished saving; resume only ever considers
checkpoints with the marker and refuses one whose files (RNG state of every rank,
optimizer, scheduler, trainer state, weights) are not all there.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from consolidation.config import TrainingConfig
from cpi_merge.errors import CpiError

COMPLETE_MARKER = ".cpi-complete"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(CpiError):
    """A checkpoint marked complete is missing files: resuming from it is refused."""


def launched_world_size() -> int:
    """Processes the launcher (``accelerate launch`` / ``torchrun``) started."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> None:
    """Join the process group when launched with several processes (gloo on CPU)."""
    if launched_world_size() > 1 and not is_distributed():
        from accelerate import PartialState

        if torch.cuda.is_available():
            PartialState()
        else:
            PartialState(cpu=True, backend="gloo")


def is_distributed() -> bool:
    """Whether torch.distributed is initialised with more than one process."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and (torch.distributed.get_world_size() > 1)
    )


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if is_distributed():
        torch.distributed.barrier()


def is_main_process() -> bool:
    """Rank 0, or the only process."""
    return not is_distributed() or torch.distributed.get_rank() == 0


def world_size() -> int:
    """Number of training processes."""
    return torch.distributed.get_world_size() if is_distributed() else 1


class MarkComplete(TrainerCallback):
    """Write a completion marker into each checkpoint once every rank has saved it."""

    def on_save(self, args, state, control, **kwargs):
        """Mark ``checkpoint-<step>`` complete (rank 0, after a barrier)."""
        barrier()
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            (folder / COMPLETE_MARKER).write_text(json.dumps({"world_size": world_size()}))
        barrier()
        return control


def _required_files(folder: Path, ranks: int) -> list[str]:
    rng = ["rng_state.pth"] if ranks == 1 else [f"rng_state_{r}.pth" for r in range(ranks)]
    weights = (
        "model.safetensors"
        if (folder / "model.safetensors").exists()
        else "model.safetensors.index.json"
    )
    return ["trainer_state.json", "optimizer.pt", "scheduler.pt", weights, *rng]


def ranks_agree(freezer, model: torch.nn.Module) -> bool | None:
    """Whether every rank froze the same positions and holds the same weights (None: 1 rank).

    A fingerprint (count and sum of frozen positions, sum of all weights in float64) is
    gathered from every process and compared.
    """
    if not is_distributed():
        return None
    positions = sum(int(p.long().sum()) for p in freezer.positions.values())
    weights = sum(float(p.detach().double().sum()) for p in model.parameters())
    mine = (freezer.frozen_entries, positions, weights)
    everyone: list = [None] * world_size()
    torch.distributed.all_gather_object(everyone, mine)
    agree = all(f == everyone[0] for f in everyone)
    if not agree:
        import logging

        logging.getLogger(__name__).error("rank fingerprints differ: %s", everyone)
    return agree


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest ``checkpoint-N`` with a completion marker, checked for completeness.

    Raises:
        CheckpointError: The newest marked checkpoint lacks a file resume needs, or was
            written by another number of processes.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = sorted(
        (int(m.group(1)), p)
        for p in output_dir.iterdir()
        if (m := _CHECKPOINT.match(p.name)) and (p / COMPLETE_MARKER).exists()
    )
    if not found:
        return None
    folder = found[-1][1]
    ranks = json.loads((folder / COMPLETE_MARKER).read_text())["world_size"]
    if ranks != world_size():
        raise CheckpointError(
            f"{folder} was written by {ranks} process(es); this run has {world_size()}. "
            "Resume with the same number of processes"
        )
    missing = [f for f in _required_files(folder, ranks) if not (folder / f).exists()]
    if missing:
        raise CheckpointError(
            f"{folder} is marked complete but lacks {missing}; refusing to resume"
        )
    return folder


def training_arguments(
    cfg: TrainingConfig, output_dir: str | Path, *, seed: int, progress: bool
) -> TrainingArguments:
    """``TrainingArguments`` for one stage."""
    max_steps = cfg.max_steps_per_stage if cfg.max_steps_per_stage is not None else -1
    save_steps = cfg.save_steps
    return TrainingArguments(
        output_dir=str(output_dir),
        learning_rate=cfg.learning_rate,
        max_steps=max_steps,
        num_train_epochs=cfg.epochs_per_stage or 1.0,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        bf16=cfg.bf16,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to=cfg.report_to,
        seed=seed,
        data_seed=seed,
        remove_unused_columns=False,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if launched_world_size() > 1 and not torch.cuda.is_available() else None,
    )


def build_optimizer(model: torch.nn.Module, cfg: TrainingConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on every parameter except biases and norm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "norm" in name.lower() else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate)


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
    args = training_arguments(cfg, output_dir, seed=seed, progress=progress)
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


def save_for_resume(model: torch.nn.Module, optimizer, folder: Path) -> None:
    """Save weights (safetensors, training precision) and optimizer state at a stage end."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(_dedupe(state), str(folder / "weights.safetensors"))
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")


def load_for_resume(model: torch.nn.Module, optimizer, folder: Path) -> None:
    """Load what :func:`save_for_resume` wrote (``weights_only`` torch.load)."""
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict(
        load_file(str(folder / "weights.safetensors")), strict=False
    )
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise CheckpointError(
            f"{folder}: stage weights do not match the model ({missing}, {unexpected})"
        )
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))


def _dedupe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tied duplicates (safetensors refuses shared storage)."""
    seen, out = set(), {}
    for k, v in state.items():
        key = (v.data_ptr(), v.shape)
        if key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out
