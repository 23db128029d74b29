"""Fixtures shared by test folders (each folder's own fixtures live in its test files)."""

from __future__ import annotations

import os
import textwrap

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N workers share the cores; one OpenMP thread each
    # (spinning OpenMP threads of several workers on the same cores slow every one of them many times over);
    # set before torch loads, and inherited by the subprocesses the tests start
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import pytest

from dyvte.engine.policy import POLICIES, POLICY_SYNTAX
from dyvte.pruning.prune import PRUNING_METHODS

from .tiny_models import TEMPLATE, make_tiny

PLUGIN = textwrap.dedent(
    '''
    """A user's file: one exit policy and one pruning method, each registered with its method syntax."""

    import torch

    from dyvte.engine.policy import ExitPolicy, register_policy
    from dyvte.pruning.prune import PatchScorer, register_pruning, scorer_method
    from dyvte.utils.syntax import ArgumentError, MethodSyntax


    class Middle(ExitPolicy):
        """Every row leaves at the middle layer L // 2, planned on the host."""

        def planned_exits(self, state):
            return [self.spec.num_layers // 2] * state.batch


    def parse_middle(argument, num_layers):
        if argument:
            raise ArgumentError("middle takes no argument")
        return [{}]


    register_policy(
        "middle",
        lambda model: Middle(),
        MethodSyntax(form="middle (no argument)", short="middle", parse=parse_middle, name=lambda options: "middle"),
    )

    # keep the first patches of each view: a scorer that prefers earlier positions
    register_pruning(
        scorer_method(
            "keepfirst",
            PatchScorer(uses_attention=False, score=lambda attention, total, seed: -torch.arange(max(total, 1.0))),
        )
    )
    '''
)


@pytest.fixture
def plugin(tmp_path):
    """The plugin file; whatever it registers is unregistered afterwards (the registries are process-wide)."""
    path = tmp_path / "my_methods.py"
    path.write_text(PLUGIN)
    yield path
    POLICIES.pop("middle", None)
    POLICY_SYNTAX.pop("middle", None)
    PRUNING_METHODS.pop("keepfirst", None)


@pytest.fixture
def dropout_model():
    """A tiny LLaVA whose attention has real dropout (0.5), returned in eval mode."""
    model, processor = make_tiny("llava")
    processor.chat_template = TEMPLATE
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
        if isinstance(getattr(module, "dropout", None), float):  # CLIP's attention keeps its rate as `dropout`
            module.dropout = 0.5
    return model, processor
