"""``import dyvte`` stays cheap: training, evaluation and plotting dependencies are imported only where they are used.

The checks run in a fresh interpreter (this test process has imported everything already). No timing: the invariant
is which modules a bare ``import dyvte`` loads, which is deterministic.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

import dyvte

HEAVY = ("torchmetrics", "lightning", "matplotlib", "datasets", "sklearn", "peft")
"""Top-level packages that ``import dyvte`` must not load (each takes up to seconds to import)."""

PROBE = """
import json, sys
import dyvte
loaded = sorted(sys.modules)
resolved = {}
for name in dyvte.__all__:
    scope = {}
    exec(f"from dyvte import {name}", scope)
    resolved[name] = scope[name] is getattr(dyvte, name)
print(json.dumps({"loaded": loaded, "all": list(dyvte.__all__), "resolved": resolved}))
"""


@pytest.fixture(scope="module")
def fresh() -> dict:
    """What a fresh ``python -c 'import dyvte'`` loaded, and whether ``from dyvte import X`` worked for each X."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _loaded_under(loaded: list[str], package: str) -> list[str]:
    return [m for m in loaded if m == package or m.startswith(package + ".")]


@pytest.mark.parametrize("package", HEAVY)
def test_import_does_not_load_heavy_dependencies(fresh, package):
    assert _loaded_under(fresh["loaded"], package) == []


def test_import_does_not_load_benchmark_or_model_code(fresh):
    # dyvte.eval.benchmark builds LLaVA models; transformers' per-model modeling code costs seconds and is loaded on
    # demand
    assert _loaded_under(fresh["loaded"], "dyvte.eval.benchmark") == []
    assert [m for m in fresh["loaded"] if m.startswith("transformers.models.") and ".modeling_" in m] == []


def test_every_public_name_resolves(fresh):
    assert fresh["all"] == list(dyvte.__all__)
    assert len(set(dyvte.__all__)) == len(dyvte.__all__)
    assert fresh["resolved"] == dict.fromkeys(dyvte.__all__, True)  # ``from dyvte import X`` gives dyvte.X
    for name in dyvte.__all__:
        assert getattr(dyvte, name) is not None


def test_reexports_are_the_submodules_objects():
    module = importlib.import_module("dyvte.eval.harness")
    assert dyvte.evaluate is module.evaluate
    assert dyvte.EvalResult is module.EvalResult
    assert dyvte.prune is importlib.import_module("dyvte.pruning.prune").prune
    assert dyvte.withdraw is importlib.import_module("dyvte.policies.withdraw").withdraw
