"""Every config key of `bond`: the documented defaults live in the package, `bond/defaults.py`.

Experiment files start from `default.get_config()` (re-exported here so that `from configs import
default` keeps working from the repository root) and set what they change. `configs/` is not
installed: experiment files are loaded by path, `--config=configs/NAME.py`.
"""

from bond.defaults import get_config, toy_schedule  # noqa: F401
