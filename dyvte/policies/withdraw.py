"""``dyvte.withdraw``: the public entry point of withdrawal; it builds an exit policy and hands it to the engine.

The engine (:mod:`dyvte.engine.withdrawal`) and the policies (:mod:`dyvte.policies`, :mod:`dyvte.policies.fastv`) live
in their own modules; this one only maps the keyword arguments onto the policy registry (docs/design.md §3, §4).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dyvte.engine.policy import ExitPolicy, make_policy
from dyvte.engine.registry import unwrap
from dyvte.engine.withdrawal import Withdrawal, WithdrawalError

__all__ = ["Withdrawal", "withdraw", "WithdrawalError"]


def withdraw(
    model: nn.Module,
    layer: int | Sequence[int] | torch.Tensor | None = None,
    *,
    calibration: Any = None,
    heads: Any = None,
    threshold: float | None = None,
    policy: ExitPolicy | str | None = None,
    allow_other_model: bool = False,
    **options: Any,
) -> Withdrawal:
    """Withdraw every visual token of every row after decoder layer ``layer - 1`` (VTW).

    Usable as a context manager or kept as a handle (``handle.remove()`` restores the model exactly)::

        with dyvte.withdraw(model, layer=16):
            out = model.generate(**inputs)

    Args:
        model: a supported transformers ``...ForConditionalGeneration`` model (see ``dyvte.supported_model_types()``).
        layer: exit layer K in ``[0, L]``; ``0`` withdraws before the first layer, ``L`` never withdraws. A 1-D
            sequence gives each row of the batch its own exit layer (the batch size must then match).
        calibration: instead of ``layer``, a :class:`dyvte.Calibration` (or a path to its directory / JSON file):
            its chosen layer is used, after checking that it was made for this model (type, depth and the saved
            model fingerprint: the same weights).
        heads: instead of ``layer``, :class:`dyvte.ExitHeads` made for this model: each row leaves after the first
            layer whose head gives P(exit) >= ``threshold``; ``handle.exit_layers`` holds the per-row layers of the
            last prefill (L = no head fired, nothing withdrawn). Decoding runs on the cache prefill left.
        threshold: P(exit) threshold for ``heads`` (default: the heads' saved threshold; > 1 never fires).
        allow_other_model: with ``heads`` or ``calibration``: use them on a model whose fingerprint differs from the
            one they saved (another fine-tune of the same shape), with a warning naming what differs; by default
            that is a :class:`dyvte.engine.fingerprint.ModelMismatchError` (a ``ValueError``), since their promise
            was measured on the other model.
        policy: instead of the above, an :class:`dyvte.engine.policy.ExitPolicy` instance, or the name of a registered
        one
            (:func:`dyvte.engine.policy.register_policy`) built with ``**options``.
        options: keyword arguments of the registered ``policy`` (only with a policy name).

    Returns:
        The :class:`Withdrawal` handle.

    Under withdrawal ``forward`` returns logits for the kept slots only, right-aligned per row; the handle's
    ``output_positions`` (``-1`` = padding slot) and ``to_input_positions`` map them back to input positions.
    For ``inputs_embeds``-only calls pass ``visual_mask=`` (``(B, T)`` bool) to the model call or to ``generate``.
    """
    model = unwrap(model)
    if sum(x is not None for x in (layer, calibration, heads, policy)) > 1:
        raise TypeError("pass exactly one of layer=, calibration=, heads= or policy=")
    if options and not isinstance(policy, str):
        raise TypeError(f"unexpected keyword arguments {sorted(options)} (options go with policy=<registered name>)")
    if allow_other_model and heads is None and calibration is None:
        raise TypeError("allow_other_model= applies to heads= and calibration= only")
    if heads is not None:
        policy = make_policy("heads", model, heads=heads, threshold=threshold, allow_other_model=allow_other_model)
        return Withdrawal(model, policy)
    if threshold is not None:
        raise TypeError("threshold= applies to heads= only")
    if calibration is not None:
        policy = make_policy("calibrated", model, calibration=calibration, allow_other_model=allow_other_model)
        return Withdrawal(model, policy)
    if layer is not None:
        return Withdrawal(model, make_policy("static", model, layer=layer))
    if isinstance(policy, ExitPolicy):
        return Withdrawal(model, policy)
    if isinstance(policy, str):
        return Withdrawal(model, make_policy(policy, model, **options))
    if policy is not None:
        raise TypeError(f"policy= takes an ExitPolicy or a registered name, got {type(policy).__name__}")
    raise TypeError("withdraw() needs layer=K, calibration=, heads= or policy=")
