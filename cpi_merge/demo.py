"""``make demo``: build the built-in example (if needed) and run the analysis on it.

The example is a synthetic family: a small Llama-shaped base and three fine-tunes of it
("math", "code", "chat"), written to ``demo_workdir/models``. math and code update the
same layers, chat others, so the analysis should put math and code in one stage.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

EXAMPLE_RECIPE = Path("merge_configs/example.yml")
WORKDIR = Path("demo_workdir")


def build_example(root: Path = WORKDIR / "models") -> None:
    """Write the example's base and task checkpoints under ``root`` unless present."""
    from cpi_merge.synthetic import LlamaShape, TaskSpec, make_family

    if (root / "chat" / "config.json").exists():
        return
    shape = LlamaShape(vocab=2048, hidden=256, intermediate=688, layers=8, heads=8, kv_heads=4)
    specs = [
        TaskSpec(hot_layers=[1, 2, 3], shared=0.9, seed=11),  # math
        TaskSpec(hot_layers=[2, 3, 4], shared=0.9, seed=12),  # code
        TaskSpec(hot_layers=[6, 7], shared=0.8, seed=13),  # chat
    ]
    click.echo(
        f"Building the example: base + 3 fine-tunes, {shape.num_parameters:,} parameters each"
    )
    make_family(root, shape, specs, shard_bytes=2_000_000, names=["math", "code", "chat"])


def main() -> int:
    """Run the demo; return the process exit status."""
    from cpi_merge.analysis import analyze
    from cpi_merge.errors import CpiError
    from cpi_merge.summary import format_summary

    if not EXAMPLE_RECIPE.exists():
        click.echo("error: run the demo from the repository root (make demo)", err=True)
        return 2
    build_example()
    out = WORKDIR / "analysis"
    start = time.perf_counter()
    try:
        plan = analyze(EXAMPLE_RECIPE, out, force=True)
    except CpiError as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    click.echo(format_summary(plan))
    click.echo(
        f"\nAnalysis took {time.perf_counter() - start:.1f} s; wrote {out}/cpi_plan.json, "
        f"{out}/jaccard.png, {out}/core_map.png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
