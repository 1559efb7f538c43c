"""Error types shared by layers that cannot import each other (dlm.checkpoint re-exports CheckpointError)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, truncated, corrupt, or from an incompatible version."""
