"""Stage 4: the masked multi-stage fine-tune of a fused model, end to end.

Stages follow the plan's groups (or one stage over all tasks). While stage k trains on
the sampled data of its tasks, the cores of the tasks of stages 1..k−1 are frozen bit for
bit (:class:`~consolidation.freezing.freezer.ExactFreezer`). Work happens in a hidden sibling folder
``.<OUT>.work`` (stage checkpoints, stage ends) so an interrupted run can ``--resume``;
OUT_DIR itself appears only when every stage is done. In multi-process runs every rank
computes the same masks from the same files; only rank 0 writes files, except the shards
of a sharded model (FSDP2), which each process saves itself.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from consolidation.config import ConsolidationConfig, load_consolidation_config
from consolidation.data.tasks import task_datasets
from consolidation.data.tokenize import collator
from consolidation.fingerprint import run_fingerprint
from consolidation.freezing.freezer import ExactFreezer
from consolidation.freezing.masks import check_plan_matches_model, core_positions
from consolidation.models import (
    full_state,
    load_for_training,
    load_tokenizer,
    local_model,
    model_folders,
    save_model,
)
from consolidation.report import LOSS_PNG, REPORT_FILE, StageRecord, plot_losses, write_report
from consolidation.training.distributed import (
    barrier,
    init_distributed,
    is_main_process,
    ranks_agree,
    summed,
    world_size,
)
from consolidation.training.integrity import seal, seal_problems
from consolidation.training.resume import load_for_resume, save_for_resume
from consolidation.training.sharded_state import is_sharded_model
from consolidation.training.sharding import Sharding, requested_sharding
from consolidation.training.trainer import build_optimizer, losses, run_stage
from consolidation.workdir import work_session
from cpi_merge.analysis.plan import CorePlan
from cpi_merge.errors import CheckpointError, CpiError, DataError, OutputError
from cpi_merge.faults import pause_point
from cpi_merge.io.lora import LoraCache, is_lora
from cpi_merge.io.manifest import MANIFEST_FILE, verify_output
from cpi_merge.io.output_dir import staged_output
from cpi_merge.provenance import package_version

STAGE_DONE = "done"
LOG = logging.getLogger(__name__)


def stage_groups(cfg: ConsolidationConfig, plan: CorePlan) -> list[list[str]]:
    """Task groups in stage order (one group of every task for ``stages: single``)."""
    if cfg.stages == "single":
        return [plan.task_names]
    if not plan.analysed:
        raise CpiError(
            f"{cfg.plan_path}: the plan has no groups (thresholds were given in the recipe); "
            "run cpi-analyze for a plan with groups, or use stages: single"
        )
    return [list(g) for g in plan.groups]


def check_data_keys(cfg: ConsolidationConfig, plan: CorePlan) -> None:
    """Every task of the plan has data, and every data key is a task of the plan."""
    planned = plan.task_names
    unknown = [k for k in cfg.data if k not in planned]
    missing = [t for t in planned if t not in cfg.data]
    problems = []
    if unknown:
        problems.append(f"data has task(s) {unknown} that are not in the plan")
    if missing:
        problems.append(f"planned task(s) {missing} have no data")
    if problems:
        raise DataError(
            "; ".join(problems) + f". The plan's tasks are {planned} (the keys of data: are "
            "these task names)"
        )


def _header(cfg: ConsolidationConfig, total: int, sharding: Sharding | None) -> dict:
    return {
        "sharding": asdict(sharding) if sharding is not None else None,
        "created_by": package_version(),
        "model": cfg.model,
        "plan": str(cfg.plan_path),
        "freeze": cfg.freeze,
        "stages_mode": cfg.stages,
        "samples_per_task": cfg.samples_per_task,
        "seed": cfg.seed,
        "world_size": world_size(),
        "total_parameters": total,
        "training": cfg.training.model_dump(),
    }


def _lora_tasks_merged(plan: CorePlan, work: Path) -> LoraCache:
    """Merge the plan's ``base+adapter`` tasks once (rank 0) before any rank reads them."""
    cache = LoraCache(str(work / "lora-cache"))
    if is_main_process():
        for task in plan.tasks:
            if is_lora(task.model):
                cache.merged_folder(task.model, role=f"plan task {task.name!r}")
    barrier()
    return cache


def _union(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per tensor, the sorted union of two sets of int32 positions."""
    out = dict(a)
    for name, positions in b.items():
        out[name] = torch.unique(torch.cat([a[name], positions])) if name in a else positions
    return out


def consolidate(
    config: ConsolidationConfig | str | Path,
    out_dir: str | Path,
    *,
    force: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> list[StageRecord]:
    """Run Stage 4 and write the consolidated model to ``out_dir``.

    Args:
        config: A :class:`ConsolidationConfig` or the path of its YAML file.
        out_dir: The output model folder (new or empty unless ``force``).
        force: Replace a non-empty ``out_dir`` and discard an earlier run's work folder.
        resume: Continue an interrupted run from its last complete stage and checkpoint.
        progress: Show progress bars.

    Returns:
        One record per stage.

    Raises:
        CpiError: Bad config, data, plan or output location; all before training starts.
    """
    cfg = config if isinstance(config, ConsolidationConfig) else load_consolidation_config(config)
    sharding = requested_sharding(cfg.training.arguments)
    init_distributed(cfg.training.arguments.get("ddp_timeout", 1800))
    out_dir = Path(out_dir)
    plan = CorePlan.load(cfg.plan_path)
    check_data_keys(cfg, plan)
    groups = stage_groups(cfg, plan)
    inputs = model_folders(cfg.model)
    fingerprint = run_fingerprint(
        cfg, world_size=world_size(), plan=cfg.plan_path, sharding=sharding
    )
    with work_session(
        out_dir, force=force, resume=resume, inputs=inputs, fingerprint=fingerprint
    ) as work:
        run = _Run(cfg, plan, groups, work, out_dir, inputs, force, resume, progress, sharding)
        return _consolidate(run)


def _finished_stage(folder: Path) -> dict | None:
    """A stage's end state, if it is complete and intact (else it is trained again)."""
    if not (folder / "record.json").exists():
        return None
    problems = seal_problems(folder)
    if problems:
        LOG.warning("training the stage again: its saved end state is damaged: %s", problems)
        if is_main_process():
            shutil.rmtree(folder, ignore_errors=True)
        return None
    return json.loads((folder / "record.json").read_text())


def check_model_unchanged(folder: str) -> None:
    """Refuse a merged model whose files changed since ``cpi-merge`` wrote them.

    The plan's cores describe the model as merged; its ``cpi_manifest.json`` holds the
    files' SHA-256. A folder without a manifest (not written by ``cpi-merge``, or with
    ``--no-checksums``) cannot be checked; that is logged.

    Raises:
        CheckpointError: A file listed in the manifest is missing or differs.
    """
    if not (Path(folder) / MANIFEST_FILE).exists():
        LOG.info("%s has no %s: not checked against its merge", folder, MANIFEST_FILE)
        return
    try:
        _, differences = verify_output(folder, extras=False)
    except OutputError:  # written with --no-checksums: nothing to compare
        return
    if differences:
        raise CheckpointError(
            f"{folder} changed since cpi-merge wrote it: "
            + "; ".join(differences[:5])
            + ". Its plan no longer describes it: merge again, or restore the files"
        )


@dataclass(frozen=True)
class _Run:
    cfg: ConsolidationConfig
    plan: CorePlan
    groups: list[list[str]]
    work: Path
    out_dir: Path
    inputs: list[str]
    force: bool
    resume: bool
    progress: bool
    sharding: Sharding | None


def _consolidate(run: _Run) -> list[StageRecord]:
    """The stages, in a prepared work folder (see :func:`consolidate`)."""
    cfg, plan, groups, work, progress = run.cfg, run.plan, run.groups, run.work, run.progress
    if is_main_process():
        check_model_unchanged(cfg.model)
    local = local_model(cfg.model, work)
    lora = _lora_tasks_merged(plan, work)
    tokenizer = load_tokenizer(local.tokenizer)
    datasets = task_datasets(cfg, tokenizer)
    model, dtype = load_for_training(local.weights, run.sharding)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    check_plan_matches_model(plan, shapes, {n for n, _ in model.named_buffers()})
    total = sum(p.numel() for p in model.parameters())
    collate = collator(tokenizer)

    optimizer = build_optimizer(model, cfg.training)
    records: list[StageRecord] = []
    frozen: dict[str, torch.Tensor] = {}  # union of the cores of the groups before this stage
    frozen_groups = 0
    for index, group in enumerate(groups, 1):
        stage_dir = work / f"stage-{index}"
        finished = _finished_stage(stage_dir / STAGE_DONE)
        barrier()
        if finished is not None:
            load_for_resume(model, optimizer, stage_dir / STAGE_DONE)
            records.append(StageRecord(**finished))
            continue
        if cfg.training.optimizer_state == "reset":
            optimizer = build_optimizer(model, cfg.training)
        if cfg.freeze != "none":  # each group's cores are streamed once, when first needed
            for group_done in groups[frozen_groups : index - 1]:
                found = core_positions(plan, group_done, progress=progress, lora=lora)
                frozen = _union(frozen, found)
            frozen_groups = max(frozen_groups, index - 1)
        freezer = ExactFreezer(model, {n: p for n, p in frozen.items() if n in shapes})
        freezer.attach(optimizer)
        stage_data = torch.utils.data.ConcatDataset([datasets[t] for t in group])
        trainer = run_stage(
            model,
            stage_data,
            collate,
            cfg.training.for_stage(len(group)),
            output_dir=stage_dir,
            optimizer=optimizer,
            seed=cfg.seed + index,
            progress=progress,
            resume=run.resume,
        )
        freezer.detach()
        drift = int(summed(freezer.drift()))
        if drift:
            raise RuntimeError(f"stage {index}: {drift} frozen entries changed (a bug: report it)")
        agree = ranks_agree(freezer, model)
        if agree is False:
            raise RuntimeError(f"stage {index}: the processes disagree on masks or weights")
        history = losses(trainer)
        record = StageRecord(
            index=index,
            tasks=list(group),
            frozen_entries=freezer.frozen_entries,
            trainable_entries=total - freezer.frozen_entries,
            steps=trainer.state.global_step,
            first_loss=history[0][1] if history else None,
            last_loss=history[-1][1] if history else None,
            freezer_bytes=int(summed(freezer.stored_bytes, op="max")),
            masked_gradients=int(summed(freezer.masked_gradients)),
            ranks_agree=agree,
            losses=history,
        )
        records.append(record)
        if cfg.save_stages:  # sharded: gathered on every process, written by the main one
            save_model(model, tokenizer, work / "stages" / str(index), dtype)
        if is_sharded_model(model) or is_main_process():
            save_for_resume(model, optimizer, stage_dir / STAGE_DONE)
        barrier()
        if is_main_process():
            (stage_dir / STAGE_DONE / "record.json").write_text(json.dumps(asdict(record)))
            seal(stage_dir / STAGE_DONE)
        barrier()
        pause_point("stage")

    state = full_state(model)  # sharded: a collective (the main process gets the weights)
    if is_main_process():
        with staged_output(run.out_dir, force=run.force, inputs=run.inputs, locked=True) as tmp:
            save_model(model, tokenizer, tmp, dtype, state=state)
            if cfg.save_stages:
                shutil.move(str(work / "stages"), str(tmp / "stages"))
            header = {
                **_header(cfg, total, run.sharding),
                "parameters_sharded": is_sharded_model(model),
                "truncated_examples": {t: d.truncated for t, d in datasets.items()},
            }
            write_report(tmp / REPORT_FILE, header, records)
            plot_losses(tmp / LOSS_PNG, records, f"CPI-FT consolidation ({cfg.freeze})")
        shutil.rmtree(work, ignore_errors=True)
    barrier()
    return records
