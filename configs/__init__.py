"""Experiment configs: one `get_config()` file per experiment (`--config=configs/NAME.py`)."""
