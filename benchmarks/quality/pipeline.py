"""One seed of the quality benchmark: every row, built with the product's own commands.

Probes (``run_probes``), analysis (``analyze``), the cpi fusion (``merge``), consolidation
and every fine-tuned baseline (``consolidate``) are the product code paths a user runs;
task arithmetic, TIES and Multi-SLERP are mergekit's own methods on the same probes.
Every model folder is scored by :class:`~benchmarks.quality.scoring.Scorer`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import yaml

from benchmarks.quality.scoring import Scorer, drop_weights
from benchmarks.quality.world import Setting, task_data, training


class SeedRun:
    """All the models of one seed, made on demand and cached on disk."""

    def __init__(
        self,
        root: Path,
        setting: Setting,
        seed: int,
        base: Path,
        *,
        progress: bool = False,
        device: str = "cpu",
        say: Callable[[str], None] | None = None,
    ):
        self.root = root / f"seed{seed}"
        self.root.mkdir(parents=True, exist_ok=True)
        self.s = setting
        self.seed = seed
        self.base = base
        self.progress = progress
        self.device = device
        self.pools, self.held_out = task_data(root, setting, seed)
        self.scorer = Scorer(setting, base, self.held_out, root / "scores.json", device)
        self.timings: dict[str, dict] = {}
        """Per model made in this process: wall seconds and optimizer steps (if trained)."""
        self.say = say or (lambda _text: None)
        """Where a line goes as each model is started and finished (the benchmark prints)."""

    @contextmanager
    def _timed(self, name: str):
        started = time.perf_counter()
        record: dict = {}
        self.say(f"{name}: started")
        yield record
        self.timings[name] = {"seconds": round(time.perf_counter() - started, 1), **record}
        self.say(f"{name}: done in {self.timings[name]['seconds']:.0f} s")

    # ---- evaluation -------------------------------------------------------------------
    def score(self, folder: Path, *, keep: bool = False) -> dict[str, float]:
        """Scores of a model folder (see :class:`Scorer`); its weights go unless ``keep``.

        Weights are deleted only when the setting says so (``keep_weights: false``), and
        never the base's, the probes' or a fusion's (later rows read them).
        """
        folder = Path(folder)
        name = folder.relative_to(self.root) if folder.is_relative_to(self.root) else folder.name
        scores = self.scorer(folder, say=lambda text: self.say(f"{name}: {text}"))
        if not (keep or self.s.keep_weights or Path(folder) == Path(self.base)):
            drop_weights(folder)
        return scores

    def diagnostics(self, plan: Path) -> dict:
        """The plan's merge-ability diagnostics (issue 14 part 1), as plain numbers."""
        doc = json.loads(Path(plan).read_text())
        keys = ("relative_update_norm", "core_energy_share", "p_holding", "energy_curve")
        return {
            "tasks": {t["name"]: {k: t.get(k) for k in keys} for t in doc["tasks"]},
            "names": [t["name"] for t in doc["tasks"]],
            **{
                k: doc.get(k)
                for k in ("task_cosine", "sign_conflict_rate", "jaccard", "groups", "verdict")
            },
        }

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
                "training": training(
                    self.s.probe_steps,
                    self.s.probe_lr,
                    self.s.batch,
                    max_length=self.s.max_length,
                ),
            }
            path = self._yaml("probe.yml", cfg)
            with self._timed("probes") as record:
                report = run_probes(path, out, force=True, progress=self.progress)
                record["steps"] = sum(r["steps"] for r in report.values())
        return {t: out / t for t in self.s.tasks}

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
            options = MergeOptions(quiet=True, cuda=self.device == "cuda")
            with self._timed(out.name):
                merge(recipe, out, force=True, seed=self.seed, options=options)
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
            with self._timed(name):
                analyze(
                    recipe,
                    out,
                    seed=self.seed,
                    order=order,
                    force=True,
                    progress=False,
                    plots=False,
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
        with self._timed(out.name):
            run_merge(
                MergeConfiguration.model_validate(recipe),
                str(out),
                options=MergeOptions(quiet=True, copy_tokenizer=True, cuda=self.device == "cuda"),
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
        save_stages: bool = False,
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
            "save_stages": save_stages,
            "freeze": freeze,
            "stages": stages,
            "training": training(
                None,
                lr or self.s.consolidation_lr,
                self.s.batch,
                steps_per_task=steps_per_task or self.s.consolidation_steps_per_task,
                optimizer_state=optimizer_state,
                max_length=self.s.max_length,
                logging_steps=5,
            ),
        }
        with self._timed(name) as record:
            records = consolidate(
                self._yaml(f"{name}.yml", cfg), out, force=True, progress=self.progress
            )
            record["steps"] = sum(r.steps for r in records)
        return out

    def _yaml(self, name: str, doc: dict) -> Path:
        path = self.root / "configs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path
