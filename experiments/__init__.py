"""Experiment runners that drive `bond` end to end (run from the repository root)."""
