"""Exact partial freezing: which entries, and how they stay bit-identical through training.

:mod:`.masks` recomputes the cores to freeze from a plan; :mod:`.freezer` keeps them
bit-identical under any optimizer.
"""
