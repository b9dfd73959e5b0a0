"""Stage 1: one short fine-tune of θ0 per task (the probes whose updates locate each core).

Writes ``OUT/<task>/`` (a model folder per task), ``OUT/probes_recipe.yml`` (a ready cpi
recipe over θ0 and the probes, for ``cpi-analyze`` / ``cpi-merge``) and
``OUT/probes_report.json``. Like consolidation, work happens in ``.<OUT>.work`` so an
interrupted run can ``--resume`` (finished probes are kept), and OUT appears when done.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
import yaml

from consolidation.config import ProbeConfig, load_probe_config
from consolidation.data.tasks import task_datasets
from consolidation.data.tokenize import collator
from consolidation.fingerprint import run_fingerprint
from consolidation.freezing.shards import local_tensor
from consolidation.models import (
    load_for_training,
    load_tokenizer,
    local_model,
    model_folders,
    save_model,
)
from consolidation.training.distributed import (
    barrier,
    init_distributed,
    is_main_process,
    summed,
    world_size,
)
from consolidation.training.integrity import SEAL, seal, seal_problems
from consolidation.training.sharding import requested_sharding
from consolidation.training.trainer import build_optimizer, losses, run_stage
from consolidation.workdir import work_session
from cpi_merge.config.recipe import DEFAULT_CORE_FRACTION, DEFAULT_TAU, METHOD_NAME
from cpi_merge.io.checkpoints import resolved_reference
from cpi_merge.io.output_dir import staged_output

RECIPE_FILE = "probes_recipe.yml"
REPORT_FILE = "probes_report.json"


def _relative_norm(model: torch.nn.Module, base: dict[str, torch.Tensor]) -> float:
    """‖θ − θ0‖ / ‖θ0‖ over every parameter (sharded: over every process's shard)."""
    num = den = 0.0
    for name, p in model.named_parameters():
        now, was = local_tensor(p.detach()).double(), local_tensor(base[name]).double()
        num += float((now - was).pow(2).sum())
        den += float(was.pow(2).sum())
    num, den = summed(num), summed(den)
    return math.sqrt(num / den) if den else math.inf


def run_probes(
    config: ProbeConfig | str | Path,
    out_dir: str | Path,
    *,
    force: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, dict]:
    """Fine-tune θ0 once per task and write the probes plus a cpi recipe over them.

    Args:
        config: A :class:`ProbeConfig` or the path of its YAML file.
        out_dir: Output folder (new or empty unless ``force``).
        force: Replace a non-empty ``out_dir`` and discard an earlier run's work.
        resume: Keep probes an interrupted run finished; continue the one it was on.
        progress: Show progress bars.

    Returns:
        Per task: steps, first and last loss, ‖θi − θ0‖ / ‖θ0‖.
    """
    cfg = config if isinstance(config, ProbeConfig) else load_probe_config(config)
    sharding = requested_sharding(cfg.training.arguments)
    init_distributed(cfg.training.arguments.get("ddp_timeout", 1800))
    out_dir = Path(out_dir)
    inputs = model_folders(cfg.model)
    fingerprint = run_fingerprint(cfg, world_size=world_size(), sharding=sharding)
    with work_session(
        out_dir, force=force, resume=resume, inputs=inputs, fingerprint=fingerprint
    ) as work:
        return _probe(cfg, work, out_dir, inputs, force, resume, progress, sharding)


def _probe(cfg, work, out_dir, inputs, force, resume, progress, sharding) -> dict[str, dict]:
    """The probes, in a prepared work folder (see :func:`run_probes`)."""
    local = local_model(cfg.model, work)
    tokenizer = load_tokenizer(local.tokenizer)
    datasets = task_datasets(cfg, tokenizer)
    collate = collator(tokenizer)
    results: dict[str, dict] = {}
    for index, (task, dataset) in enumerate(datasets.items()):
        done = work / task / "probe.json"
        if done.exists() and not seal_problems(work / task):
            results[task] = json.loads(done.read_text())
            continue
        model, dtype = load_for_training(local.weights, sharding)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = run_stage(
            model,
            dataset,
            collate,
            cfg.training,
            output_dir=work / f"{task}.checkpoints",
            optimizer=build_optimizer(model, cfg.training),
            seed=cfg.seed + index,
            progress=progress,
            resume=resume,
        )
        history = losses(trainer)
        results[task] = {
            "steps": trainer.state.global_step,
            "first_loss": history[0][1] if history else None,
            "last_loss": history[-1][1] if history else None,
            "relative_update_norm": _relative_norm(model, start),
        }
        save_model(model, tokenizer, work / task, dtype)  # sharded: gathered, then written
        if is_main_process():
            shutil.rmtree(work / f"{task}.checkpoints", ignore_errors=True)
            done.write_text(json.dumps(results[task]))
            seal(work / task)
        barrier()
        del model, trainer, start

    if is_main_process():
        with staged_output(out_dir, force=force, inputs=inputs, locked=True) as tmp:
            for task in datasets:
                shutil.move(str(work / task), str(tmp / task))
                (tmp / task / "probe.json").unlink()
                (tmp / task / SEAL).unlink()
            final = out_dir.resolve()
            recipe = {
                "merge_method": METHOD_NAME,
                "base_model": resolved_reference(cfg.model),
                "models": [{"model": str(final / task), "name": task} for task in datasets],
                "parameters": {"core_fraction": DEFAULT_CORE_FRACTION, "tau": DEFAULT_TAU},
            }
            header = (
                "# cpi recipe over the probes written by `cpi-consolidate probe`.\n"
                f"# Run: cpi-merge {final / RECIPE_FILE} MERGED_DIR\n"
                "# Override example: parameters: {core_fraction: 0.02, tau: 0.2}\n"
            )
            (tmp / RECIPE_FILE).write_text(header + yaml.safe_dump(recipe, sort_keys=False))
            (tmp / REPORT_FILE).write_text(json.dumps(results, indent=1) + "\n")
        shutil.rmtree(work, ignore_errors=True)
    barrier()
    return results
