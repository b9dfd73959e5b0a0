"""Score a model folder: accuracy per task, general-text loss, distance from θ0; cached.

Every row of the benchmark is one model folder. Its scores are:

* per task and ``avg``: exact match on the held-out prompts (the toy: greedy generation,
  :func:`~benchmarks.quality.evaluate.exact_match`; SmolLM2: the same verdict in one
  forward pass, :func:`~benchmarks.quality.chat_eval.score_chat`);
* ``general_loss`` (SmolLM2): per-token loss on held-out general text
  (:mod:`benchmarks.quality.general_text`);
* ``update_norm``: ‖θ − θ0‖ / ‖θ0‖ over every parameter (tied weights once), how far the
  row moved from the base.

Scores are written to a JSON file as soon as they are known, keyed by the folder and its
``config.json`` time, so a rerun skips scored models and a model's weights may be
deleted once scored (``keep_weights: false``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from benchmarks.quality.world import Setting


class Scorer:
    """Scores model folders of one benchmark run against held-out rows."""

    def __init__(
        self, setting: Setting, base: Path, held_out: dict[str, list], cache: Path, device: str
    ):
        self.s = setting
        self.base = base
        self.held_out = held_out
        self.cache = cache
        self.device = device
        self._scores = json.loads(cache.read_text()) if cache.exists() else {}
        self._tokenizer = None
        self._base_params: dict[str, torch.Tensor] | None = None
        self._windows = None
        self.seconds = 0.0
        """Wall time spent scoring in this process (models scored, not cached ones)."""
        self.scored = 0

    def __call__(self, folder: Path, say=None) -> dict[str, float]:
        """The scores of ``folder`` (computed once, then read from the cache file).

        ``say``, if given, gets one line when a model has been scored (with its time).
        """
        key = self._key(folder)
        if key not in self._scores:
            started = time.perf_counter()
            self._scores[key] = self._score(folder)
            took = time.perf_counter() - started
            self.seconds += took
            if say is not None:
                say(f"scored in {took:.0f} s")
            self.scored += 1
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            partial = self.cache.with_suffix(".partial")
            partial.write_text(json.dumps(self._scores, indent=1) + "\n")
            partial.replace(self.cache)
        return self._scores[key]

    @staticmethod
    def _key(folder: Path) -> str:
        config = Path(folder) / "config.json"
        stamp = config.stat().st_mtime_ns if config.exists() else 0
        return f"{Path(folder).resolve()}@{stamp}"

    def _score(self, folder: Path) -> dict[str, float]:
        from transformers import AutoModelForCausalLM

        from consolidation.models import load_tokenizer

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.base)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        model.to(self.device)
        scores = {t: self._accuracy(model, rows) for t, rows in self.held_out.items()}
        scores["avg"] = sum(scores.values()) / len(self.held_out)
        if self.s.general_windows:
            from benchmarks.quality.general_text import general_loss, windows

            if self._windows is None:
                self._windows = windows(
                    self._tokenizer, self.s.general_windows, self.s.general_window
                )
            scores["general_loss"] = general_loss(model, self._windows, device=self.device)
        scores["update_norm"] = self._update_norm(model)
        return scores

    def _accuracy(self, model, rows: list) -> float:
        if self.s.model == "toy":
            from benchmarks.quality.evaluate import exact_match

            return exact_match(model, self._tokenizer, rows)
        from benchmarks.quality.chat_eval import score_chat

        return score_chat(model, self._tokenizer, rows, device=self.device).exact_match

    def _update_norm(self, model) -> float:
        if self._base_params is None:
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(str(self.base), dtype=torch.float32)
            self._base_params = {n: p.detach().clone() for n, p in base.named_parameters()}
        num = den = 0.0
        for name, p in model.named_parameters():
            ref = self._base_params[name]
            num += float((p.detach().cpu().double() - ref.double()).pow(2).sum())
            den += float(ref.double().pow(2).sum())
        return math.sqrt(num / den) if den else math.inf


def drop_weights(folder: Path) -> None:
    """Delete a scored model's weight files (config, reports and the score stay)."""
    for pattern in ("*.safetensors", "*.safetensors.index.json"):
        for path in Path(folder).glob(pattern):
            path.unlink()
    stages = Path(folder) / "stages"
    if stages.is_dir():
        for stage in stages.iterdir():
            drop_weights(stage)
