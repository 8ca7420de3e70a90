"""The checkpoint package's error: `CheckpointError`, raised by resume, loading and the readers.

Its own module so that every module of the package can raise it without importing another one's
code: store.py (completeness) calls deepspeed_files.py, which raises it too; store.py re-exports it
where it always was (`flip_scale.checkpoint.store.CheckpointError`).
"""


class CheckpointError(RuntimeError):
    pass


class CheckpointSaveError(CheckpointError):
    """A failed save that stops the run: checkpoint.required, more than checkpoint.max_failed_saves
    failures in a row, or the final checkpoint."""


class IncompatibleCheckpoint(CheckpointError):
    """A checkpoint this run can never load (a newer format_version, another architecture): the
    same on every try, so a usage error (flip-train exits 2, never requeued)."""
