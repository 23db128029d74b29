"""Optional outside tools a test needs (a browser, a harness, a serving library): skip where one is missing, fail
where CI said it must be there.

``.ci/run`` installs every such tool and sets ``DYVTE_REQUIRE_TOOLS`` (a comma-separated list, or ``all``), so a
missing install step fails CI instead of passing as skipped tests. On a developer's machine without the tool the
tests that need it skip, naming what to install.
"""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType

import pytest


def _required(name: str) -> bool:
    wanted = {part.strip() for part in os.environ.get("DYVTE_REQUIRE_TOOLS", "").split(",") if part.strip()}
    return "all" in wanted or name in wanted


def require_module(module: str, *, tool: str | None = None, install: str = "") -> ModuleType:
    """Import ``module``, or skip (fail when ``tool`` or ``module`` is in ``DYVTE_REQUIRE_TOOLS``)."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        message = f"{module} is not installed ({install or 'see .ci/run'}): {error}"
        if _required(tool or module):
            pytest.fail(message + " -- DYVTE_REQUIRE_TOOLS says it must be")
        pytest.skip(message)


def require_program(*names: str, tool: str, install: str = "") -> str:
    """The path of the first of ``names`` on PATH, or skip (fail when ``tool`` is in ``DYVTE_REQUIRE_TOOLS``)."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    message = f"none of {', '.join(names)} is on PATH ({install or 'see .ci/run'})"
    if _required(tool):
        pytest.fail(message + " -- DYVTE_REQUIRE_TOOLS says it must be")
    pytest.skip(message)
