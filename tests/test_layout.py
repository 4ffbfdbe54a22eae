"""The package's imports run one way, down the flow, with no cycles: the import-linter contracts
in pyproject.toml hold on the code, and they do catch an upward import or a cycle."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_an_upward_import_breaks_the_layers_contract(tmp_path: Path) -> None:
    root = copy_of_package(tmp_path)
    with open(root / "search" / "compress" / "build.py", "a") as f:
        f.write("\nfrom search.study import loop  # noqa: E402  an upward import\n")
    out = lint(root)
    assert out.returncode != 0
    assert "search.compress is not allowed to import search.study" in out.stdout


def test_a_cycle_between_sibling_modules_breaks_the_acyclic_contract(tmp_path: Path) -> None:
    root = copy_of_package(tmp_path)
    with open(root / "search" / "study" / "storage.py", "a") as f:
        f.write("\nimport search.study.loop  # noqa: E402  loop imports storage: a cycle\n")
    out = lint(root)
    assert out.returncode != 0
    assert "No cycles are allowed in search.study" in out.stdout
    assert ".storage -> .loop" in out.stdout
