"""The consolidation configs shipped under consolidation/configs/ validate and are documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from consolidation.config import load_consolidation_config, load_probe_config

CONFIGS = Path(__file__).parent.parent / "consolidation" / "configs"


@pytest.mark.parametrize(
    "name, loader",
    [("consolidate.yml", load_consolidation_config), ("probe.yml", load_probe_config)],
)
def test_shipped_config(name, loader):
    path = CONFIGS / name
    loader(path)
    comments = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert path.read_text().startswith("# ")
    assert "cpi-consolidate" in comments and "Override example" in comments


def test_config_validation_lists_problems(tmp_path):
    bad = tmp_path / "c.yml"
    bad.write_text("model: m\ndata: {}\ntraining: {learning_rate: -1}\nfreeze: sometimes\n")
    from cpi_merge.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_consolidation_config(bad)
    text = str(err.value)
    assert "data" in text and "learning_rate" in text and "freeze" in text
    bad.write_text(
        "model: m\ndata: {a: b}\ntraining: {max_steps_per_stage: 5, epochs_per_stage: 1}\n"
    )
    with pytest.raises(ConfigError, match="not both"):
        load_consolidation_config(bad)
