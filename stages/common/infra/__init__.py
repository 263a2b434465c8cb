"""Running a stage: one-line errors, atomic writes, progress, processes, digests, adapters."""
