"""Stage 4 of CPI-FT (the masked multi-stage fine-tune) and Stage 1 (per-task probes).

``config`` (validated YAML) → ``data`` (JSONL → sampled, tokenized rows) →
``freezing`` (which entries, kept bit-identical) → ``training`` (processes, the Trainer,
checkpoints, resume) → ``stages`` (``cpi-consolidate``) and ``probe``
(``cpi-consolidate probe``). Built on transformers' Trainer and accelerate.
"""
