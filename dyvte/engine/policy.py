"""The exit-policy protocol and the registry of policies (docs/design.md §4, "Engine and policies").

An exit policy decides *which rows leave the residual stream at which layer*, and which of their tokens go; the
engine (:mod:`dyvte.engine.withdrawal`) does everything else (hooks, layouts, masks, rotary positions, the KV cache).
The engine imports no policy: a policy is a subclass of :class:`ExitPolicy` in its own module, registered under a name
with
:func:`register_policy`, and ``dyvte.withdraw`` builds it from the registry::

    # dyvte/policies/my_policy.py -- the whole change, plus one import line in dyvte/policies/__init__.py
    class EveryRowAtTheMiddle(ExitPolicy):
        def planned_exits(self, state):
            return [self.spec.num_layers // 2] * state.batch

    register_policy("middle", lambda model, **options: EveryRowAtTheMiddle())

    with dyvte.withdraw(model, policy="middle"):
        model.generate(...)

Host syncs (docs/design.md §4, "Hot path"): a policy whose exits are known before the forward
(:meth:`ExitPolicy.planned_exits` returns a list) costs no per-layer sync; a run-time policy
(:meth:`ExitPolicy.decide`) costs exactly one read of its ``(B,)`` decision per layer where some row is still in, and
none once every row has left.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from dyvte.utils.syntax import MethodSyntax

if TYPE_CHECKING:
    from dyvte.engine.registry import ModelSpec
    from dyvte.engine.withdrawal import ForwardState, Withdrawal

__all__ = ["ExitPolicy", "POLICIES", "POLICY_SYNTAX", "PolicyFactory", "register_policy", "make_policy"]

#: ``factory(model, **options) -> ExitPolicy``
PolicyFactory = Callable[..., "ExitPolicy"]

POLICIES: dict[str, PolicyFactory] = {}
"""Registered exit policies by name (``dyvte.withdraw(model, policy=name, **options)``)."""

POLICY_SYNTAX: dict[str, MethodSyntax] = {}
"""The method-string syntax of each registered policy that the evaluation harness can run (``static:K``, ...)."""


def register_policy(name: str, factory: PolicyFactory, syntax: MethodSyntax | None = None) -> PolicyFactory:
    """Register ``factory`` (``factory(model, **options) -> ExitPolicy``) under ``name``; returns it unchanged.

    With ``syntax``, the evaluation harness runs the policy from method strings ``name:ARGS`` (``train/eval.py
    --methods``, the report, compositions ``pruning+name:ARGS``) and names its table rows, with no other edit.

    Raises:
        ValueError: ``name`` is already registered to another factory.
    """
    if POLICIES.get(name, factory) is not factory:
        raise ValueError(f"an exit policy named {name!r} is already registered")
    POLICIES[name] = factory
    if syntax is not None:
        POLICY_SYNTAX[name] = syntax
    return factory


def make_policy(name: str, model: nn.Module, **options: Any) -> ExitPolicy:
    """Build the registered policy ``name`` for ``model``.

    Raises:
        ValueError: no policy of that name is registered.
    """
    factory = POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown exit policy {name!r}; registered: {', '.join(sorted(POLICIES))}")
    return factory(model, **options)


class ExitPolicy:
    """Which rows leave at which layer, and which tokens they drop. Subclass it and override what differs.

    The engine calls, in this order:

    * :meth:`bind` once, when the handle is built (``self.spec`` is then the resolved model);
    * :meth:`attach` once, for extra hooks (FastV ranks at layer K-1);
    * per top-level call: :meth:`start`, then, for a new sequence, :meth:`planned_exits`;
    * per hooked layer of a new sequence whose exits are not planned: :meth:`decide`;
    * when rows leave: :meth:`droppable` (device) and :meth:`kept_tokens` (host).

    Attributes:
        keeps_visual: some visual tokens stay after an exit (FastV); the engine then keeps the model's own
            attention pairs among the kept tokens of exited rows (Gemma3's bidirectional image attention).
        spec: the resolved model (set by :meth:`bind`).
    """

    keeps_visual: ClassVar[bool] = False
    spec: ModelSpec

    def bind(self, spec: ModelSpec) -> None:
        """Check the policy against the model and remember it (raise ``ValueError`` / ``TypeError`` if unfit)."""
        self.spec = spec

    def earliest_exit(self) -> int:
        """The smallest layer a row may leave at: layers before it are never hooked (``L``: never withdraws)."""
        return 1

    @property
    def layer(self) -> int | None:
        """The static exit layer K shared by every row, or ``None`` when rows differ or decide at run time."""
        return None

    def attach(self, handle: Withdrawal) -> list[torch.utils.hooks.RemovableHandle]:
        """Register extra hooks (removed with the handle); ``handle.state`` is the current call's state."""
        return []

    def start(self, state: ForwardState, kwargs: dict[str, Any]) -> None:
        """Called at the start of every top-level call, before anything runs (read the call's arguments here)."""

    def planned_exits(self, state: ForwardState) -> list[int] | None:
        """Each row's exit layer for a new sequence, when known on the host before the forward; ``None``: decide
        at run time with :meth:`decide`. ``L`` means the row never leaves."""
        return None

    def decide(self, layer: int, hidden: torch.Tensor, state: ForwardState) -> torch.Tensor:
        """``(B,)`` bool, rows that want to leave at ``layer`` (``hidden``: ``(B, T', d)``, the input of ``layer`` in
        the current layout ``state.idx``). Only called for run-time policies, only while some row is still in."""
        raise NotImplementedError(f"{type(self).__name__} plans its exits; decide() is not used")

    def droppable(self, state: ForwardState) -> torch.Tensor:
        """``(B, T)`` bool: the call's tokens a row drops when it leaves (padding always goes; the final token
        always stays). Default: the visual tokens."""
        return state.visual

    def kept_tokens(self, stats: list[list[int]], state: ForwardState) -> list[int]:
        """Per row, an upper bound (exact where possible) of the tokens a leaving row keeps, from host counts.

        Args:
            stats: per row ``[text, visual, final_extra]``: valid non-visual tokens, valid visual tokens, and 1 when
                the final token is padding or visual (it stays anyway).

        The engine sizes the shortened layout by these counts without reading anything back.
        """
        return [text + extra for text, _visual, extra in stats]

    @property
    def visual_after(self) -> torch.Tensor | None:
        """``(B,)`` visual tokens per row that stay after the exit (FastV), or ``None`` (all go)."""
        return None
