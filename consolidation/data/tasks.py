"""Every task's data for a run: a balanced, seeded sample per task, tokenized."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

from consolidation.data.examples import Example, read_jsonl
from consolidation.data.tokenize import TokenizedDataset, build_dataset
from cpi_merge.errors import DataError

LOG = logging.getLogger(__name__)


def balanced_sample(
    examples: Sequence[Example], size: int | None, *, seed: int, task: str
) -> list[Example]:
    """A seeded sample of ``size`` examples (all of them when ``size`` is None).

    The sample depends on the seed and the task's name only (not on where the files are).

    Raises:
        DataError: Fewer examples than requested (a balanced sample is impossible).
    """
    if size is None:
        return list(examples)
    if len(examples) < size:
        raise DataError(
            f"task {task!r} has {len(examples)} examples, fewer than samples_per_task = {size}; "
            "lower samples_per_task or add data"
        )
    return random.Random(f"{seed}:{task}").sample(list(examples), size)


def task_datasets(cfg, tokenizer) -> dict[str, TokenizedDataset]:
    """Read, sample and tokenize every task's data: the one path from JSONL to training rows.

    Every file is read and sampled before anything is tokenized, so a bad file is
    reported first. Examples longer than ``training.max_length`` are cut (a warning says
    how many; the report records it).

    Args:
        cfg: A consolidation or probe config (its ``data``, ``samples_per_task`` (None:
            every example), ``seed`` and ``training.max_length``).
        tokenizer: The model's tokenizer.

    Returns:
        Task name → tokenized dataset, in the order of ``cfg.data``.

    Raises:
        DataError: A file is missing or malformed, or too small for the sample.
    """
    samples = {
        task: balanced_sample(read_jsonl(path), cfg.samples_per_task, seed=cfg.seed, task=task)
        for task, path in cfg.data.items()
    }
    datasets = {}
    for task, rows in samples.items():
        dataset = build_dataset(rows, tokenizer, cfg.training.max_length, what=f"task {task!r}")
        if dataset.truncated:
            LOG.warning(
                "task %r: %d of %d examples are longer than max_length = %d and were cut",
                task,
                dataset.truncated,
                len(rows),
                cfg.training.max_length,
            )
        datasets[task] = dataset
    return datasets
