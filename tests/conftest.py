from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Trained tasks and tuning databases go to a per-session folder, not the user's cache."""
    os.environ["SEARCH_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    os.environ.setdefault("SEARCH_TORCH_THREADS", "1")  # the suite's figures: one thread
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_task():
    from tests.tasks import tiny

    return tiny()


def cli_env() -> dict[str, str]:
    """Environment for `search` subprocesses: same cache, and tests.tasks importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env
