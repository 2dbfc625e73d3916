"""A finished (or running) training run, as later stages see it: the run directory, and what is done with whole runs."""

from pinnerformer.runs.run_dir import RunDir

__all__ = ["RunDir"]
