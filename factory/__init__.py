"""The application layer: from a dataset spec to published cases, with no Prefect.

``spec`` (the YAML spec and its validation), ``plan`` (cases, IDs, seeds), ``case`` (one case: mask,
generate, QC, write), ``dataset`` (committing records, the dataset row, the card), ``validate`` (dataset
metrics), ``preflight`` (checks before the first case), ``models`` (model references), ``storage``
(publishing files under a root), ``machine`` (threads, devices, code version). ``flows`` wires these
into Prefect tasks and flows and holds the CLI; ``maisi_core`` and ``catalog`` are the libraries below.
"""
