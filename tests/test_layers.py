"""The layers of DESIGN.md are an import-linter contract (pyproject.toml). These tests run it on the package
and prove it is live: in a copy of the package, each import that once crept in (a cycle, a sideways import
between feature packages, an upward import hidden inside a function) makes ``lint-imports`` fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path, src: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", str(root / "pyproject.toml")], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory) -> Path:
    """A copy of the package and of pyproject.toml (the contract) to break on purpose."""
    root = tmp_path_factory.mktemp("layers")
    shutil.copytree(REPO / "src" / "ldmclip", root / "src" / "ldmclip",
                    ignore=shutil.ignore_patterns("__pycache__", "*.gz", "*.txt", "*.json", "static", "templates"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_package_keeps_its_layers():
    result = _lint(REPO, REPO / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


# (module that gets the bad import, the import, the contract that must say so)
BAD_IMPORTS = [
    # the old cycles: checkpoints -> factory (config suggestions) and models.clip -> checkpoints (save_pretrained)
    ("checkpoints/state_dict.py", "from ..registry import list_models", "layers"),
    ("models/clip.py", "from ..checkpoints import load_into_model", "layers"),
    # ldmclip/__init__ -> conditioning -> cache -> ldmclip.__version__
    ("conditioning/cache.py", "from .. import __version__", "facade"),
    # feature packages reaching into each other
    ("search/index.py", "from ..eval.sources import open_zero_shot", "features"),
    ("conditioning/cache.py", "from ..train.distributed import init_distributed", "layers"),
    ("eval/evaluate.py", "from ..train.data import Validation", "layers"),
    # a cycle inside one package
    ("checkpoints/hf.py", "from .state_dict import read_state_dict", "acyclic"),
]


@pytest.mark.parametrize("module, line, contract", BAD_IMPORTS, ids=[f"{m}:{c}" for m, _, c in BAD_IMPORTS])
def test_the_contract_fails_on_a_bad_import(package_copy: Path, module: str, line: str, contract: str):
    target = package_copy / "src" / "ldmclip" / module
    original = target.read_text(encoding="utf-8")
    # Inside a function, as the old lazy imports were: hiding an import does not hide it from the contract.
    target.write_text(original + f"\n\ndef _bad_import_for_the_test():\n    {line}  # noqa\n", encoding="utf-8")
    try:
        result = _lint(package_copy, package_copy / "src")
    finally:
        target.write_text(original, encoding="utf-8")
    assert result.returncode != 0, f"lint-imports accepted {line!r} in {module}:\n{result.stdout}"
    broken = result.stdout.split("Broken contracts", 1)[-1]  # an upward import is often a cycle too
    names = {"layers": "ldmclip layers", "features": "feature packages use eval only from train",
             "acyclic": "no import cycles", "facade": "no module of the package imports the public facade"}
    assert names[contract] in broken, result.stdout
