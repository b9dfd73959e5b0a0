"""Which cpi-merge wrote a file (recorded in plans, manifests and reports)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """``cpi-merge <version>`` (or a source-tree marker), for provenance records."""
    try:
        return f"cpi-merge {version('cpi-merge')}"
    except PackageNotFoundError:
        return "cpi-merge (source tree)"
