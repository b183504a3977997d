"""Trackers: how ckptd learns which pages changed between snapshots."""
