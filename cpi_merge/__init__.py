"""cpi-merge: Core Parameter Isolation Fine-Tuning (arXiv 2508.21741) as a mergekit plugin."""

__version__ = "0.1.0"
