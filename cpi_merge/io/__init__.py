"""Checkpoints in, folders out: everything that touches files.

Opening and checking model folders from their headers (:mod:`~cpi_merge.io.checkpoints`,
:mod:`~cpi_merge.io.layout`, :mod:`~cpi_merge.io.compatibility`,
:mod:`~cpi_merge.io.opened`), writing output folders that appear only when complete
(:mod:`~cpi_merge.io.output_dir`) and the SHA-256 manifest of inputs and outputs
(:mod:`~cpi_merge.io.manifest`). The analysis pass reads each tensor on its own
(:mod:`~cpi_merge.io.direct_read`); everything else reads through mergekit's lazy loader.
"""
