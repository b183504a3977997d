"""ckptd: incremental memory checkpoints of live Linux processes."""

__version__ = "0.1.0"
