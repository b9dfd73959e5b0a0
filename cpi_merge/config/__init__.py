"""Configuration: the ``cpi`` merge recipe and the one strict YAML loader every config uses.

Recipes (:mod:`cpi_merge.config.recipe`), consolidation and probe configs
(``consolidation.config``) are pydantic models read by :func:`~cpi_merge.config.strict.load_yaml`,
which refuses unknown keys and reports every problem at once, before any tensor is read.
"""
