"""The exit-policy protocol and the registry of policies (docs/design.md §4, "Engine and policies").

An exit policy decides *which rows leave the residual stream at which layer*, and which of their tokens go; the
engine (:mod:`dyvte.engine.withdrawal`) does everything else (hooks, layouts, masks, rotary positions, the KV cache).
The engine imports no policy: a policy is a subclass of :class:`ExitPolicy` in its own module, registered under a name
with :func:`register_policy`, and ``dyvte.withdraw`` builds it from the registry::

    # dyvte/policies/my_policy.py -- the whole change, plus one import line in dyvte/policies/__init__.py
    class EveryRowAtTheMiddle(ExitPolicy):
        def planned_exits(self, view):
            return [self.spec.num_layers // 2] * view.batch

    register_policy("middle", lambda model, **options: EveryRowAtTheMiddle())

    with dyvte.withdraw(model, policy="middle"):
        model.generate(...)

What a policy sees of a call is a :class:`PolicyView`: the call's shape, whether it starts a sequence, its ids, its
visual and valid tokens, and the current layout of the hidden states; read-only (the engine's own per-call state,
:class:`dyvte.engine.state.ForwardState`, is none of a policy's business). Every method that looks at the call takes
one; a policy's own hooks (registered in :meth:`ExitPolicy.attach`) read the call in progress from
``handle.policy_view``. A policy keeps what it computes on itself (FastV's ranking), never on the view.

Host syncs (docs/design.md §4, "Hot path"): a policy whose exits are known before the forward
(:meth:`ExitPolicy.planned_exits` returns a list) costs no per-layer sync; a run-time policy
(:meth:`ExitPolicy.decide`) costs exactly one read of its ``(B,)`` decision per layer where some row is still in, and
none once every row has left.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from dyvte.utils.syntax import MethodSyntax

if TYPE_CHECKING:
    from dyvte.engine.registry import ModelSpec
    from dyvte.engine.withdrawal import Withdrawal

__all__ = ["ExitPolicy", "PolicyView", "POLICIES", "POLICY_SYNTAX", "PolicyFactory", "register_policy", "make_policy"]

#: ``factory(model, **options) -> ExitPolicy``
PolicyFactory = Callable[..., "ExitPolicy"]

POLICIES: dict[str, PolicyFactory] = {}
"""Registered exit policies by name (``dyvte.withdraw(model, policy=name, **options)``)."""

POLICY_SYNTAX: dict[str, MethodSyntax] = {}
"""The method-string syntax of each registered policy that the evaluation harness can run (``static:K``, ...)."""


def register_policy(name: str, factory: PolicyFactory, syntax: MethodSyntax | None = None) -> PolicyFactory:
    """Register ``factory`` (``factory(model, **options) -> ExitPolicy``) under ``name``; returns it unchanged.

    With ``syntax``, the evaluation harness runs the policy from method strings ``name:ARGS`` (``train/evaluate.py
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


@dataclass(frozen=True, slots=True)
class PolicyView:
    """What an exit policy reads of one call of the top-level model: read-only (do not write into its tensors).

    The engine hands a view made at the moment of each call of the policy, so ``idx`` is the layout of that moment.

    Attributes:
        batch: B.
        num_tokens: T, tokens of this call.
        new_sequence: the call starts a sequence (no cache, or an empty one: a prefill); otherwise it continues the
            cache of the last call (a decode step, or a continuation).
        input_ids: ``(B, T)`` the call's ids, or ``None`` (``inputs_embeds``).
        visual: ``(B, T)`` bool, the call's visual tokens.
        valid: ``(B, T)`` bool, the attention-mask entry of each of the call's tokens.
        idx: ``(B, T')`` long, the current layout of the hidden states: slot ``s`` of row ``b`` holds token
            ``idx[b, s]`` (``-1``: a padding slot); ``None`` while no row is shorter (slot ``t`` holds token ``t``).
    """

    batch: int
    num_tokens: int
    new_sequence: bool
    input_ids: torch.Tensor | None
    visual: torch.Tensor
    valid: torch.Tensor
    idx: torch.Tensor | None


class ExitPolicy:
    """Which rows leave at which layer, and which tokens they drop. Subclass it and override what differs.

    The engine calls, in this order (each method that looks at the call gets its :class:`PolicyView`):

    * :meth:`bind` once, when the handle is built (``self.spec`` is then the resolved model);
    * :meth:`attach` once, for extra hooks (FastV ranks at layer K-1);
    * per top-level call: :meth:`start`, then, for a new sequence, :meth:`planned_exits`, then, when a row may get
      shorter in this call, :meth:`kept_tokens` (host);
    * per hooked layer of a new sequence whose exits are not planned: :meth:`decide`;
    * when rows leave and get shorter: :meth:`droppable` (device).

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
        """Register extra hooks (removed with the handle); in them, ``handle.policy_view`` is the
        :class:`PolicyView` of the call in progress (``None`` outside a call)."""
        return []

    def start(self, view: PolicyView, kwargs: dict[str, Any]) -> None:
        """Called at the start of every top-level call, before anything runs (read the call's arguments here)."""

    def planned_exits(self, view: PolicyView) -> list[int] | None:
        """Each row's exit layer for a new sequence, when known on the host before the forward; ``None``: decide
        at run time with :meth:`decide`. ``L`` means the row never leaves."""
        return None

    def decide(self, layer: int, hidden: torch.Tensor, view: PolicyView) -> torch.Tensor:
        """``(B,)`` bool, rows that want to leave at ``layer`` (``hidden``: ``(B, T', d)``, the input of ``layer`` in
        the current layout ``view.idx``). Only called for run-time policies, only while some row is still in."""
        raise NotImplementedError(f"{type(self).__name__} plans its exits; decide() is not used")

    def droppable(self, view: PolicyView) -> torch.Tensor:
        """``(B, T)`` bool: the call's tokens a row drops when it leaves (padding always goes; the final token
        always stays). Default: the visual tokens."""
        return view.visual

    def kept_tokens(self, stats: list[list[int]], view: PolicyView) -> list[int]:
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

    #: what a policy that watches its scores for a shift keeps (:class:`dyvte.policies.shift.ScoreMonitor`)
    shift_monitor: Any = None

    def shift_report(self, alpha: float = 0.01) -> Any:
        """Whether the policy's scores at use time look like its calibration data's (learned exits:
        :meth:`dyvte.policies.learned.LearnedExit.shift_report`); ``None`` for a policy with nothing to check."""
        return None
