"""Training plumbing, on transformers' Trainer and accelerate.

Processes (:mod:`.distributed`), one stage on the Trainer (:mod:`.trainer`), trusted
checkpoints (:mod:`.checkpoints`) and stage-end state for ``--resume`` (:mod:`.resume`).
"""
