"""One seed of the quality benchmark: every row, built with the product's own commands.

Probes (``run_probes``), analysis (``analyze``), the cpi fusion (``merge``), consolidation
and every fine-tuned baseline (``consolidate``) are the product code paths a user runs;
task arithmetic, TIES and Multi-SLERP are mergekit's own methods on the same probes.
Every model folder is evaluated by exact match on the held-out prompts of every task.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from benchmarks.quality.world import Setting, task_data, training


class SeedRun:
    """All the models of one seed, made on demand and cached on disk."""

    def __init__(self, root: Path, setting: Setting, seed: int, base: Path, *, progress=False):
        self.root = root / f"seed{seed}"
        self.root.mkdir(parents=True, exist_ok=True)
        self.s = setting
        self.seed = seed
        self.base = base
        self.progress = progress
        self.pools, self.held_out = task_data(root, setting, seed)
        self._tokenizer = None
        self._scores: dict[str, dict[str, float]] = {}

    # ---- evaluation -------------------------------------------------------------------
    def score(self, folder: Path) -> dict[str, float]:
        """Exact-match accuracy per task (and the average) of a model folder."""
        key = str(folder)
        if key not in self._scores:
            from transformers import AutoModelForCausalLM

            from benchmarks.quality.evaluate import exact_match
            from consolidation.models import load_tokenizer

            if self._tokenizer is None:
                self._tokenizer = load_tokenizer(self.base)
            model = AutoModelForCausalLM.from_pretrained(str(folder))
            accs = {t: exact_match(model, self._tokenizer, self.held_out[t]) for t in self.s.tasks}
            accs["avg"] = sum(accs.values()) / len(self.s.tasks)
            self._scores[key] = accs
        return self._scores[key]

    # ---- stage 1: probes ------------------------------------------------------------
    def probes(self) -> dict[str, Path]:
        """One probe per task (fine-tune of θ0 on that task alone)."""
        out = self.root / "probes"
        if not (out / "probes_recipe.yml").exists():
            from consolidation.probe import run_probes

            cfg = {
                "model": str(self.base),
                "data": {t: str(self.pools[t]) for t in self.s.tasks},
                "seed": self.seed,
                "training": training(self.s.probe_steps, self.s.probe_lr, self.s.batch),
            }
            path = self._yaml("probe.yml", cfg)
            run_probes(path, out, force=True, progress=self.progress)
        return {t: out / t for t in self.s.tasks}

    def relative_norms(self) -> dict[str, float]:
        """‖θi − θ0‖ / ‖θ0‖ of every probe (from the probes' report)."""
        report = json.loads((self.root / "probes" / "probes_report.json").read_text())
        return {t: report[t]["relative_update_norm"] for t in self.s.tasks}

    # ---- stages 2-3: analysis and merges ----------------------------------------------
    def _cpi_recipe(self, models: list[Path], core_fraction: float, tau: float) -> dict:
        return {
            "merge_method": "cpi",
            "base_model": str(self.base),
            "models": [{"model": str(m)} for m in models],
            "parameters": {"core_fraction": core_fraction, "tau": tau, "omega": self.s.omega},
        }

    def fused(self, core_fraction: float | None = None) -> Path:
        """The cpi fusion of the probes (with its plan: p, τ of the setting)."""
        p = self.s.core_fraction if core_fraction is None else core_fraction
        out = self.root / f"fused_p{p:g}"
        if not (out / "cpi_manifest.json").exists():
            from mergekit.options import MergeOptions

            from cpi_merge.commands import merge

            recipe = self._yaml(
                f"cpi_p{p:g}.yml", self._cpi_recipe(list(self.probes().values()), p, self.s.tau)
            )
            merge(recipe, out, force=True, seed=self.seed, options=MergeOptions(quiet=True))
        return out

    def plan(
        self,
        tau: float,
        *,
        core_fraction: float | None = None,
        models=None,
        order: str = "random",
        name: str | None = None,
    ) -> Path:
        """An analysis plan of the probes (or ``models``) with grouping threshold ``tau``."""
        p = self.s.core_fraction if core_fraction is None else core_fraction
        models = models or list(self.probes().values())
        name = name or f"plan_p{p:g}_tau{tau:g}"
        out = self.root / name
        if not (out / "cpi_plan.json").exists():
            from cpi_merge.commands import analyze

            recipe = self._yaml(f"{name}.yml", self._cpi_recipe(models, p, tau))
            analyze(
                recipe, out, seed=self.seed, order=order, force=True, progress=False, plots=False
            )
        return out / "cpi_plan.json"

    def mergekit(self, method: str) -> Path:
        """task_arithmetic (λ), TIES (density) or Multi-SLERP of the probes, by mergekit."""
        out = self.root / f"mk_{method}"
        if (out / "config.json").exists():
            return out
        probes = [str(p) for p in self.probes().values()]
        if method == "task_arithmetic":
            models = [
                {"model": p, "parameters": {"weight": self.s.task_arithmetic_lambda}}
                for p in probes
            ]
        elif method == "ties":
            models = [
                {"model": p, "parameters": {"weight": 1.0, "density": self.s.ties_density}}
                for p in probes
            ]
        else:
            models = [{"model": p, "parameters": {"weight": 1.0}} for p in probes]
        recipe = {
            "merge_method": method,
            "base_model": str(self.base),
            "models": models,
            "dtype": "float32",
        }
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge

        shutil.rmtree(out, ignore_errors=True)
        run_merge(
            MergeConfiguration.model_validate(recipe),
            str(out),
            options=MergeOptions(quiet=True, copy_tokenizer=True),
        )
        return out

    # ---- stage 4 and the fine-tuned baselines ----------------------------------------
    def consolidate(
        self,
        name: str,
        *,
        model: Path,
        plan: Path,
        freeze: str,
        stages: str = "plan",
        samples: int | None = None,
        steps_per_task: int | None = None,
        lr: float | None = None,
        optimizer_state: str = "carry",
        data=None,
    ) -> Path:
        """A run of the product's consolidation (stages, freezing, budget per task)."""
        out = self.root / name
        if (out / "consolidation_report.json").exists():
            return out
        from consolidation.stages import consolidate

        names = [t["name"] for t in json.loads(plan.read_text())["tasks"]]
        data = data or self.pools
        cfg = {
            "model": str(model),
            "plan": str(plan),
            "data": {t: str(data[t]) for t in names},
            "samples_per_task": samples or self.s.samples_per_task,
            "seed": self.seed,
            "save_stages": True,
            "freeze": freeze,
            "stages": stages,
            "training": training(
                None,
                lr or self.s.consolidation_lr,
                self.s.batch,
                steps_per_task=steps_per_task or self.s.consolidation_steps_per_task,
                optimizer_state=optimizer_state,
                logging_steps=5,
            ),
        }
        consolidate(self._yaml(f"{name}.yml", cfg), out, force=True, progress=self.progress)
        return out

    def _yaml(self, name: str, doc: dict) -> Path:
        path = self.root / "configs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path
