"""search: hardware-aware model-compression search.

    from search import Task, search
    front = search(task, target="host", budget="5ms", trials=24, out="runs/x")

Names are imported on first use (PEP 562), so `search --help` does not load torch and TVM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from search.api import Front, open_front, search, shared_front
    from search.core.data import Split
    from search.core.task import Task
    from search.study.config import SearchConfig

__all__ = ["Front", "SearchConfig", "Split", "Task", "open_front", "search", "shared_front"]

_WHERE = {"search": "search.api", "open_front": "search.api", "Front": "search.api",
          "shared_front": "search.api",
          "Task": "search.core.task", "Split": "search.core.data",
          "SearchConfig": "search.study.config"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'search' has no attribute {name!r}")
