"""Stages 1-2: exact core regions, their overlaps, task groups and the stage order.

Streams ``|θi − θ0|`` over whole checkpoints (:mod:`~cpi_merge.analysis.delta_stream`),
selects each task's exact global top-k (:mod:`~cpi_merge.analysis.select_buffer`,
:mod:`~cpi_merge.analysis.select_histogram`), defines core membership once
(:mod:`~cpi_merge.analysis.core_rule`), groups tasks by Jaccard overlap
(:mod:`~cpi_merge.analysis.grouping`) and records it all in a :class:`CorePlan`
(``cpi_plan.json``): :func:`~cpi_merge.analysis.run.run_analysis`; the candidates of a
chunk are listed by :mod:`~cpi_merge.analysis.positions`. ``cpi-analyze`` is
:func:`cpi_merge.commands.analyze`.
"""
