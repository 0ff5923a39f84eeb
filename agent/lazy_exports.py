"""Names a package re-exports without importing their modules until first use (PEP 562).

``__getattr__ = lazy_exports(__name__, {"KubernetesCache": "agent.k8s.cache"})`` in a
package's ``__init__`` makes ``from agent.k8s import KubernetesCache`` work while importing
``agent.k8s.client`` alone does not import ``agent.k8s.cache`` (and what it imports).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``homes[name]`` and returns its ``name``."""

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(homes[name]), name)

    return __getattr__
