"""The analysis notebooks execute headless (nbclient) on small toy workdirs and draw their figures.

Workdirs come from a few real training steps (`bond.train.train_and_evaluate`) of J-BOND,
REINFORCE and DPO; the notebooks read them through BOND_WORKDIR / BOND_WORKDIRS, as a user would.
"""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from bond import train
from configs import toy_baselines, toy_jbond
from conftest import QUICK_COMPILE_XLA_FLAGS

# Compiles much and runs little: XLA's quicker codegen (tests/conftest.py, `quick_compiles`).
pytestmark = pytest.mark.quick_compiles

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")
# notebook -> figures it must draw
FIGURES = {"bon_theory": 3, "analyze_run": 4, "compare_methods": 3}
STEPS = 6


def tiny(config):
  config.train.num_steps, config.train.log_every, config.eval.every = STEPS, 2, 2
  config.data.batch_size = 16
  return config


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  configs = {"jbond": toy_jbond.get_config(),
             "reinforce": toy_baselines.get_config("reinforce_0.01"),
             "dpo": toy_baselines.get_config("dpo")}
  out = {}
  for name, config in configs.items():
    out[name] = str(root / name)
    train.train_and_evaluate(tiny(config), out[name])
  return out


def execute(name: str, env: dict[str, str], monkeypatch) -> nbformat.NotebookNode:
  monkeypatch.setenv("XLA_FLAGS",    # the kernel's
                     f"{os.environ.get('XLA_FLAGS', '')} {QUICK_COMPILE_XLA_FLAGS}".strip())
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  nb = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
  # From the repo root, like `jupyter notebook notebooks/...` there (`configs` importable).
  NotebookClient(nb, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": REPO}}).execute()   # raises on any error
  return nb


def outputs(nb, kind: str) -> list:
  return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
          if kind in o.get("data", {}) or o.get("output_type") == kind]


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_committed_without_outputs(name):
  nb = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_bon_theory(monkeypatch):
  nb = execute("bon_theory", {}, monkeypatch)
  assert len(outputs(nb, "image/png")) == FIGURES["bon_theory"]


@pytest.mark.slow
def test_analyze_run(workdirs, monkeypatch):
  nb = execute("analyze_run", {"BOND_WORKDIR": workdirs["jbond"]}, monkeypatch)
  assert len(outputs(nb, "image/png")) == FIGURES["analyze_run"]
  text = "".join(o["text"] for o in outputs(nb, "stream"))
  assert f"up to step {STEPS}; last checkpoint: step {STEPS}" in text
  assert "objective jbond" in text and "prompt " in text and "π_ref" in text


@pytest.mark.slow
def test_compare_methods(workdirs, monkeypatch):
  runs = ",".join(f"{name}={path}" for name, path in workdirs.items())
  nb = execute("compare_methods", {"BOND_WORKDIRS": runs}, monkeypatch)
  assert len(outputs(nb, "image/png")) == FIGURES["compare_methods"]
  table = "".join(o["text"] for o in outputs(nb, "stream"))
  for name in workdirs:
    assert any(line.startswith(name) and f" {STEPS} " in line for line in table.splitlines()), table


@pytest.mark.slow
def test_analyze_run_trains_its_own_job_without_a_workdir(monkeypatch):
  """No BOND_WORKDIR: the notebook trains a tiny toy J-BOND job in its kernel, then draws."""
  monkeypatch.delenv("BOND_WORKDIR", raising=False)
  nb = execute("analyze_run", {}, monkeypatch)
  assert len(outputs(nb, "image/png")) == FIGURES["analyze_run"]
  assert "objective jbond" in "".join(o["text"] for o in outputs(nb, "stream"))
