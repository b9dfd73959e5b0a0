"""The real-model quality benchmark end to end, at smoke-test size (``make test-real``).

Every row of the table, the forgetting table, the diagnostics and the machine record are
produced for SmolLM2-135M-Instruct by the same code as the full run (a few minutes: two
tasks, a few steps per fine-tune).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real
ROOT = Path(__file__).resolve().parents[1]


def test_every_row_and_diagnostic_of_the_smollm2_benchmark(tmp_path):
    out = tmp_path / "quick"
    command = [sys.executable, "-m", "benchmarks.quality.run", "--model", "smollm2", "--quick"]
    subprocess.run([*command, "--out", str(out)], cwd=ROOT, check=True, timeout=1800)
    summary = json.loads((out / "results.json").read_text())
    rows = summary["main"]
    assert {"base θ0", "Full SFT (multi-task)", "mergekit TIES", "CPI fusion alone"} <= set(rows)
    assert "control: θ0 + same data" in rows and "probe: add" in rows
    for name, cols in rows.items():
        assert 0.0 <= cols["avg"][0] <= 1.0, name
        assert 0.5 < cols["general_loss"][0] < 10, name  # a working language model
    assert rows["base θ0"]["update_norm"][0] == 0.0
    assert rows["Full SFT (multi-task)"]["update_norm"][0] > 0.0
    seed = summary["per_seed"]["0"]
    assert set(seed["diagnostics"]["tasks"]) == {"add", "words"}
    assert seed["diagnostics"]["verdict"] and seed["seconds_per_step"] > 0
    assert "drop on A" in next(iter(summary["forgetting"].values()))
    assert "thread(s)" in summary["machine"]["summary"]
    assert "general-text loss" in (out / "results.md").read_text()
    # scored models lost their weights; the base, probes and fusion kept theirs
    assert not list((out / "seed0" / "full_sft").glob("*.safetensors"))
    assert list((out / "seed0" / "probes" / "add").glob("*.safetensors"))
