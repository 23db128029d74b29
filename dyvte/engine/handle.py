"""The handle protocol: what every active withdrawal or pruning reports to the evaluation harness (docs/design.md §3).

``dyvte.withdraw`` returns a :class:`dyvte.Withdrawal`, ``dyvte.prune`` a :class:`dyvte.Pruning` (before the LLM) or a
FastV withdrawal; each satisfies :class:`Handle`, with ``None`` for what does not apply to it. A new pruning method's
handle satisfies it too, and the harness (:mod:`dyvte.evaluate`, :mod:`dyvte.eval.methods`) reads nothing else,
except the optional ``shift_monitor`` / ``shift_report()`` of a withdrawal by learned exits (read with ``getattr``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["Handle", "ComposedHandle"]


@runtime_checkable
class Handle(Protocol):
    """An active withdrawal or pruning on one model (a context manager; ``remove()`` restores the model).

    Attributes:
        exit_layers: ``(B,)`` long, each row's exit layer in the last prefill (``L`` = never), or ``None`` when
            nothing is withdrawn inside the LLM.
        fed_tokens: ``(B,)`` long, non-padding tokens per row the LLM received in the last prefill, or ``None``
            (the whole prompt).
        fed_visual: ``(B,)`` long, visual tokens per row the LLM received, or ``None`` (all of them).
        visual_after: ``(B,)`` long, visual tokens per row that stay after the exit layer (FastV), or ``None``
            (none stay).
    """

    @property
    def exit_layers(self) -> torch.Tensor | None: ...

    @property
    def fed_tokens(self) -> torch.Tensor | None: ...

    @property
    def fed_visual(self) -> torch.Tensor | None: ...

    @property
    def visual_after(self) -> torch.Tensor | None: ...

    def remove(self) -> None: ...


class ComposedHandle:
    """Two nested handles read as one: exits from ``inner`` (a withdrawal), what the LLM received from ``outer``
    (a pruning before the LLM); each field is the inner one's unless that is ``None``."""

    def __init__(self, inner: Handle, outer: Handle) -> None:
        self.inner, self.outer = inner, outer

    def _pick(self, name: str) -> torch.Tensor | None:
        value = getattr(self.inner, name)
        return value if value is not None else getattr(self.outer, name)

    @property
    def exit_layers(self) -> torch.Tensor | None:
        return self._pick("exit_layers")

    @property
    def fed_tokens(self) -> torch.Tensor | None:
        return self._pick("fed_tokens")

    @property
    def fed_visual(self) -> torch.Tensor | None:
        return self._pick("fed_visual")

    @property
    def visual_after(self) -> torch.Tensor | None:
        return self._pick("visual_after")

    @property
    def shift_monitor(self) -> object:
        """The inner handle's score monitor, if it keeps one."""
        return getattr(self.inner, "shift_monitor", None)

    def shift_report(self, alpha: float = 0.01) -> object:
        """The inner handle's shift report (:meth:`dyvte.engine.withdrawal.Withdrawal.shift_report`), or ``None``."""
        report = getattr(self.inner, "shift_report", None)
        return None if report is None else report(alpha)

    def remove(self) -> None:
        self.inner.remove()
        self.outer.remove()
