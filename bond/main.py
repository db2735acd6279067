"""Entry point: `python -m bond.main --config=configs/toy_jbond.py --workdir=/tmp/run`.

Modes: train (default), eval (exact toy metrics / samples of the latest checkpoint),
sample (completions from the configured model), bon (write a best-and-worst-of-N JSONL dataset),
train_rm (Bradley–Terry reward model on the configured pairs, written to workdir/rm).
Any config key is overridable: `--config.bond.beta=0.5`.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "toy_jbond.py")


def _fail_unknown_config_key(error: Exception, argv: list[str]):
  """Exits like absl's flag errors do, without a traceback.

  ml_collections raises a bare AttributeError/KeyError for a `--config.<key>` the config lacks.
  """
  overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
  hint = " ".join(str(error).strip("'\"").replace("\\'", "'").split("\\n"))
  sys.stderr.write(f"FATAL Flags parsing error: unknown config key among {overrides}: {hint}. "
                   "Every key must be declared in configs/default.py.\n")
  sys.exit(1)


try:   # ml_collections applies the --config.* overrides in sys.argv here, at definition time
  _CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Experiment config file.")
except (AttributeError, KeyError) as e:
  if __name__ != "__main__":
    raise
  _fail_unknown_config_key(e, sys.argv)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bond_toy_jbond", "Checkpoints, metrics, plots.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "bon", "train_rm"], "What to run.")
_PROMPTS = flags.DEFINE_multi_string("prompt", [], "Prompt text(s) for --mode=sample.")
_OUT = flags.DEFINE_string("out", "", "Output JSONL for --mode=bon (default workdir/bon.jsonl).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:   # orbax's INFO lines would bury the progress bar
    logging.set_verbosity(logging.WARNING)
  from bond import sharding
  sharding.maybe_initialize_distributed()
  from bond import config as config_lib
  config = _CONFIG.value
  config_lib.validate(config)      # bad values fail here, before any compute
  if _MODE.value == "train":
    from bond import train
    train.train_and_evaluate(config, _WORKDIR.value)
  elif _MODE.value == "sample":
    from bond import cli
    cli.sample(config, _PROMPTS.value)
  elif _MODE.value == "train_rm":
    from bond import cli
    cli.train_rm(config, _WORKDIR.value)
  else:
    from bond import cli
    cli.write_bon(config, _OUT.value or os.path.join(_WORKDIR.value, "bon.jsonl"))


def parse_flags(argv):
  """absl's flag parsing; an unknown `--config.<key>` fails like any other flag error."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    _fail_unknown_config_key(e, argv)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
