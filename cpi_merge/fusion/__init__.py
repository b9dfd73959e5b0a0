"""Stage 3: the ``cpi`` merge method.

The tensor maths (:mod:`~cpi_merge.fusion.claims`, :mod:`~cpi_merge.fusion.fold`,
:mod:`~cpi_merge.fusion.kernel`) is plain torch; :mod:`~cpi_merge.fusion.method` is the
only module that touches mergekit's method types; :mod:`~cpi_merge.fusion.recipe_for_mergekit`
turns a recipe and a plan into the recipe mergekit runs. ``cpi-merge`` itself is
:func:`cpi_merge.commands.merge`.
"""
