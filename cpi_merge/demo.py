"""``make demo``: build the built-in example (if needed), analyse, merge, load the result.

The example is a synthetic family: a small Llama-shaped base and three fine-tunes of it
("math", "code", "chat"), written to ``demo_workdir/models``. math and code update the
same layers, chat others, so the analysis should put math and code in one stage. The
merged model is written to ``demo_workdir/merged`` and loaded back with transformers.
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


def load_and_check(folder: Path) -> str:
    """Load a merged folder with transformers (strictly) and run one forward pass."""
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    missing, unexpected = info["missing_keys"], info["unexpected_keys"]
    if missing or unexpected:
        raise RuntimeError(f"merged model does not load cleanly: {missing=} {unexpected=}")
    tokens = torch.randint(
        0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        logits = model(tokens).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError("merged model produces non-finite logits")
    params = sum(p.numel() for p in model.parameters())
    shape = tuple(logits.shape)
    return f"loaded {folder} with transformers: {params:,} parameters, finite logits {shape}"


def main() -> int:
    """Run the demo; return the process exit status."""
    from mergekit.options import MergeOptions

    from cpi_merge.errors import CpiError
    from cpi_merge.merge import merge
    from cpi_merge.summary import format_summary

    if not EXAMPLE_RECIPE.exists():
        click.echo("error: run the demo from the repository root (make demo)", err=True)
        return 2
    build_example()
    out = WORKDIR / "merged"
    start = time.perf_counter()
    try:
        result = merge(EXAMPLE_RECIPE, out, force=True, options=MergeOptions(quiet=True))
    except CpiError as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    took = time.perf_counter() - start
    click.echo(format_summary(result.plan))
    click.echo(
        f"\ncpi-merge (analysis + merge) took {took:.1f} s; wrote {out}/ "
        "(model, cpi_plan.json, jaccard.png, core_map.png, README.md model card)"
    )
    click.echo(load_and_check(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
