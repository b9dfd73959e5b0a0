"""What exact freezing costs: step time and peak memory of a masked stage vs the same stage unmasked.

Each run is its own process (peak RSS from ``wait4``): a small Llama (~35M parameters,
float32) trained through the same ``run_stage`` (transformers Trainer, AdamW, weight decay,
gradient clipping) on the same random token batches, with or without an ExactFreezer
holding 3% of every tensor's entries frozen (every 33rd entry) (the most a last stage freezes with 3 tasks at
p = 1%: the union of three 1% cores). Runs alternate masked / unmasked ``--repeat`` times;
step time is the median over steps after ``--warmup``.

With ``--fsdp`` every run is 2 processes under ``torchrun`` (gloo on CPU, or one GPU
each) with the model sharded as it loads (FSDP2, as ``cpi-consolidate`` shards it): the
overhead of freezing on shards against the same sharded run without it, and the freezer
storage of each process.

Usage:
    python -m benchmarks.consolidation_overhead            # ~2-4 minutes on 2 cores
    python -m benchmarks.consolidation_overhead --hidden 256 --layers 4 --steps 20
    python -m benchmarks.consolidation_overhead --fsdp     # 2 processes, FSDP2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time, torch
from transformers import TrainerCallback
from consolidation.config import TrainingConfig
from consolidation.freezing.freezer import ExactFreezer
from consolidation.models import load_for_training
from consolidation.training.distributed import init_distributed, is_main_process, world_size
from consolidation.training.sharding import Sharding
from consolidation.training.trainer import build_optimizer, run_stage

masked, steps, share, folder, out = sys.argv[1] == "1", int(sys.argv[2]), float(sys.argv[3]), *sys.argv[4:6]
sharded = world_size_asked = int(__import__("os").environ.get("WORLD_SIZE", "1")) > 1
if sharded:
    init_distributed()
model, _ = load_for_training(folder, Sharding("benchmark", False, False) if sharded else None)
g = torch.Generator().manual_seed(0)
rows = [{"input_ids": t.tolist(), "labels": t.tolist()} for t in torch.randint(4, 1024, (512, 64), generator=g)]
def collate(batch):
    ids = torch.tensor([b["input_ids"] for b in batch])
    return {"input_ids": ids, "labels": ids.clone()}
cfg = TrainingConfig(learning_rate=1e-4, max_steps_per_stage=steps, per_device_train_batch_size=8,
                     weight_decay=0.1, max_grad_norm=1.0, logging_steps=1000)
optimizer = build_optimizer(model, cfg)
params = sum(p.numel() for p in model.parameters())
stored = 0
if masked:  # every k-th entry, from a seeded offset: no large temporaries in the measurement
    step_k = round(1 / share)
    frozen = {n: torch.arange(i % step_k, p.numel(), step_k, dtype=torch.int32)
              for i, (n, p) in enumerate(model.named_parameters())}
    freezer = ExactFreezer(model, frozen).attach(optimizer)
    stored = freezer.stored_bytes
    del frozen
times = []
class Clock(TrainerCallback):
    def on_step_begin(self, *a, **k): self.t = time.perf_counter()
    def on_step_end(self, *a, **k): times.append(time.perf_counter() - self.t)
run_stage(model, rows, collate, cfg, output_dir=out, optimizer=optimizer, seed=0, progress=False,
          resume=False, callbacks=[Clock()])
if masked:
    assert freezer.drift() == 0
per_process = [stored]
if sharded:
    per_process = [None] * world_size()
    torch.distributed.all_gather_object(per_process, stored)
if is_main_process():
    print(json.dumps({"times": times, "params": params, "stored": per_process}))
"""


def _model_folder(args, root: str) -> str:
    """The benchmark's model, saved once (the runs load it, sharded or not)."""
    from benchmarks.tiny_models import tiny_llama

    folder = os.path.join(root, "model")
    tiny_llama(1024, hidden=args.hidden, layers=args.layers, heads=8, seed=0).save_pretrained(
        folder
    )
    return folder


def run(masked: bool, args, folder: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        script = os.path.join(out, "child.py")
        with open(script, "w") as f:
            f.write(CHILD)
        launcher = []
        if args.fsdp:
            launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
            launcher += ["--master_port", str(29700 + (os.getpid() % 200))]
        cmd = [sys.executable, *launcher, script, "1" if masked else "0", str(args.steps)]
        cmd += [str(args.share), folder, os.path.join(out, "run")]
        env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.fsdp else None
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        _, status, usage = os.wait4(proc.pid, 0)
        stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(stderr[-3000:])
    result = json.loads(stdout.strip().splitlines()[-1])
    result["rss_mib"] = usage.ru_maxrss / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--share", type=float, default=0.03)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--fsdp", action="store_true", help="2 processes, model sharded (FSDP2), as cpi-consolidate"
    )
    args = parser.parse_args()

    results: dict[bool, list[dict]] = {True: [], False: []}
    started = time.time()
    root = tempfile.mkdtemp(prefix="cpi-overhead-")
    folder = _model_folder(args, root)
    for r in range(args.repeat):
        for masked in (False, True):
            res = run(masked, args, folder)
            results[masked].append(res)
            step = statistics.median(res["times"][args.warmup :])
            print(
                f"round {r + 1} {'masked  ' if masked else 'unmasked'}: median step "
                f"{step * 1e3:8.1f} ms, peak RSS {res['rss_mib']:7.0f} MiB",
                flush=True,
            )

    def step_time(masked: bool) -> float:
        return statistics.median(t for res in results[masked] for t in res["times"][args.warmup :])

    def rss(masked: bool) -> float:
        return statistics.median(res["rss_mib"] for res in results[masked])

    import shutil

    shutil.rmtree(root, ignore_errors=True)
    params = results[True][0]["params"]
    per_process = results[True][0]["stored"]
    stored = max(per_process)
    world = len(per_process)
    overhead = step_time(True) / step_time(False) - 1
    extra = (rss(True) - rss(False)) * 2**20 / params
    how = "2 processes, FSDP2 (gloo on CPU), batch 8 per process" if args.fsdp else "batch 8"
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; model {params / 1e6:.1f}M params "
        f"(hidden {args.hidden}, {args.layers} layers, float32), {how} x 64 tokens, "
        f"{args.share:.0%} of entries frozen, {args.repeat} runs each, {time.time() - started:.0f} s"
    )
    print(
        f"median step: unmasked {step_time(False) * 1e3:.1f} ms, masked {step_time(True) * 1e3:.1f} ms"
        f" -> overhead {overhead:+.1%}"
    )
    print(
        f"peak RSS (median): unmasked {rss(False):.0f} MiB, masked {rss(True):.0f} MiB -> "
        f"{extra:+.3f} bytes per parameter"
    )
    if world == 1:
        print(
            f"freezer storage: {stored / 2**20:.1f} MiB = {stored / params:.3f} bytes per parameter"
        )
    else:
        shares = ", ".join(f"{b / 2**20:.2f}" for b in per_process)
        print(
            f"freezer storage per process: {shares} MiB; the largest is "
            f"{stored / (params / world):.3f} bytes per parameter / world size "
            f"({stored / params:.3f} bytes per model parameter)"
        )


if __name__ == "__main__":
    main()
