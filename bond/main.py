"""Entry point: `python -m bond.main --config=configs/toy_jbond.py --workdir=/tmp/run`.

Modes: train (default), eval (held-out evaluation of the latest checkpoint against a sampled
Best-of-N reference, `--checkpoint=DIR|none`; plus the exact metrics on the toy task),
sample (completions from the configured model), bon (write a best-and-worst-of-N JSONL dataset),
train_rm (Bradley–Terry reward model on the configured pairs, written to workdir/rm).
Any config key is overridable: `--config.bond.beta=0.5`.

Experiment files are loaded by path; the default, `configs/toy_jbond.py`, is found next to the
package in a source checkout (an editable install, `pip install -e .`). A user error (a bad config
value, a missing or malformed data file, a checkpoint that does not load) ends the run with one
`FATAL ...` line on stderr and exit status 1; `--traceback` shows the Python traceback instead.
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
                   "Every key must be declared in bond/defaults.py (configs/default.py).\n")
  sys.exit(1)


def _one_line(error: BaseException) -> str:
  """The message of `error` on one line (a config file's embedded traceback: its last line)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if any(line.startswith("Traceback (most recent call last)") for line in lines):
    lines = lines[:1] + lines[-1:]
  return " ".join(lines) or type(error).__name__


def _fatal(message: str):
  sys.stderr.write(f"FATAL {message}\n")
  sys.exit(1)


def _fail_missing_config(path: str):
  if path == _DEFAULT_CONFIG:
    _fatal(f"--config: the default config {path} is missing; it ships in bond's source "
           "repository (install with `pip install -e .` from a checkout), or pass --config=PATH")
  _fatal(f"--config: no config file {path!r} (experiment files are loaded by path, e.g. "
         "--config=configs/toy_jbond.py from the repository root)")


def _config_arg(argv: list[str]) -> str:
  """The config file named by `--config=PATH[:ARG]` / `--config PATH` in argv, else the default."""
  path = _DEFAULT_CONFIG
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
  return path.split(":", 1)[0]


def _make_configs_importable(path: str):
  """Experiment files import their siblings (`from configs import default`): put the directory
  holding a `configs/` package on sys.path, so that they load from any working directory."""
  folder = os.path.dirname(os.path.abspath(path))
  root = os.path.dirname(folder)
  if (os.path.basename(folder) == "configs" and os.path.isfile(os.path.join(folder, "__init__.py"))
      and root not in sys.path):
    sys.path.insert(0, root)


if __name__ == "__main__":
  _make_configs_importable(_config_arg(sys.argv))

try:   # ml_collections applies the --config.* overrides in sys.argv here, at definition time
  _CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Experiment config file.")
except (AttributeError, KeyError) as e:
  if __name__ != "__main__":
    raise
  _fail_unknown_config_key(e, sys.argv)
except OSError:   # the config file to apply overrides to is missing
  if __name__ != "__main__":
    raise
  _fail_missing_config(_config_arg(sys.argv))
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bond_toy_jbond", "Checkpoints, metrics, plots.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample", "bon", "train_rm"],
                          "What to run.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "", "For --mode=eval: a checkpoint directory, '' = the latest in "
    "WORKDIR/checkpoints, 'none' = the config's model itself.")
_PROMPTS = flags.DEFINE_multi_string("prompt", [], "Prompt text(s) for --mode=sample.")
_OUT = flags.DEFINE_string("out", "", "Output JSONL for --mode=bon (default workdir/bon.jsonl).")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "On an error, print the Python traceback "
                               "instead of one FATAL line.")


def _config_path() -> str:
  """The --config file (without its ':argument'), as given or the default."""
  return config_flags.get_config_filename(flags.FLAGS["config"])


def _load_config():
  """The parsed --config; one FATAL line if its file is missing."""
  path = _config_path()
  if not os.path.isfile(path):
    _fail_missing_config(path)
  return _CONFIG.value


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:   # orbax's INFO lines would bury the progress bar
    logging.set_verbosity(logging.WARNING)
  config = _load_config()
  try:
    _malloc_hugepages(config)    # first: it may re-execute the process
    from bond import sharding
    sharding.maybe_initialize_distributed()
    _run(config)
  except (ValueError, OSError) as e:   # OSError: FileNotFoundError and friends
    if _TRACEBACK.value:
      raise
    _fatal(_one_line(e))


def _malloc_hugepages(config) -> None:
  """Re-executes this process with glibc's huge pages for large buffers when the config asks for
  them (`train.malloc_hugepages`, bond/hugepages.py); before JAX allocates anything."""
  from bond import hugepages
  hugepages.reexec_for(config)
  logging.info(hugepages.status())


def _run(config):
  from bond import config as config_lib
  config_lib.validate(config)      # bad values and missing files fail here, before any compute
  from bond import aot
  aot.enable_compilation_cache(config.train.compilation_cache)   # reruns skip compiling
  if _MODE.value == "train":
    from bond import train
    train.train_and_evaluate(config, _WORKDIR.value)
  elif _MODE.value == "eval":
    from bond import train
    train.evaluate_checkpoint(config, _WORKDIR.value, _CHECKPOINT.value)
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
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    _fail_unknown_config_key(e, argv)
  except OSError:   # an override of a config file that is missing
    _fail_missing_config(_config_arg(argv))
  except flags.Error as e:   # like app.parse_flags_with_usage, on one line
    _fatal(f"Flags parsing error: {_one_line(e)}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
