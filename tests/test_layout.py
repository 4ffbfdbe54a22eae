"""The package's imports run one way, down the flow, with no cycles: the import-linter contracts
in pyproject.toml hold on the code, and they do catch an upward import or a cycle."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--no-cache", "--config", str(root / "pyproject.toml")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def copy_of_package(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "search", tmp_path / "search",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_imports_run_down_the_flow_without_cycles() -> None:
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 kept, 0 broken" in out.stdout


BREAKS = {  # an injected import -> what the broken contract must say
    "upward": ("compress/build.py", "from search.study import loop  # an upward import",
               ["search.compress is not allowed to import search.study"]),
    "cycle": ("study/storage.py", "import search.study.loop  # loop imports storage: a cycle",
              ["No cycles are allowed in search.study", ".storage -> .loop"]),
}


@pytest.mark.parametrize("kind", list(BREAKS))
def test_an_injected_upward_import_or_cycle_breaks_a_contract(kind: str, tmp_path: Path) -> None:
    module, line, says = BREAKS[kind]
    root = copy_of_package(tmp_path)
    with open(root / "search" / module, "a") as f:
        f.write(f"\n{line}\n")
    out = lint(root)
    assert out.returncode != 0
    for text in says:
        assert text in out.stdout
