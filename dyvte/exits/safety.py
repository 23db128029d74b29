"""The DyVTE rule on teacher-forced logits: is withdrawal at exit layer K safe for a sample?

With the ground-truth answer teacher-forced, withdrawal at K is safe when the withdrawn model's argmax tokens agree
with the full model's on more than ``agree`` (99%) of the answer positions AND its answer loss is at most
``loss_ratio`` (1.03) times the full model's (:func:`exit_safe`; ``<=`` rather than ``<`` so that identical
predictions are always safe, even at zero loss). The other per-sample measures of a withdrawn forward
that :mod:`dyvte.exits.labels` stores (the answer-position KL, whether greedy decoding would write the forced answer)
live here too: plain tensor maths, no model.
"""

from __future__ import annotations

import torch

__all__ = [
    "answer_argmax_equal",
    "answer_kl",
    "answer_loss",
    "exit_safe",
    "final_prompt_slot",
    "smallest_safe_layer",
]


def _answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool: positions whose next token is a labelled answer token."""
    return torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1), value=False)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample mean next-token cross-entropy over the answer tokens: ``(B, T, V), (B, T) -> (B,)``."""
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T): the token each position predicts
    nll = torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), targets.clamp(min=0), reduction="none"
    )  # (B, T)
    mask = targets != -100
    return (nll * mask).sum(1) / mask.sum(1).clamp(min=1)


def exit_safe(
    full_logits: torch.Tensor,
    withdrawn_logits: torch.Tensor,
    labels: torch.Tensor,
    agree: float = 0.99,
    loss_ratio: float = 1.03,
) -> torch.Tensor:
    """The DyVTE rule per sample.

    Args:
        full_logits: ``(B, T, V)`` the full model's logits at the input positions (teacher forcing).
        withdrawn_logits: ``(B, T, V)`` the withdrawn model's logits at the same positions (only the answer
            positions are read).
        labels: ``(B, T)`` answer token ids, -100 elsewhere.
        agree: required fraction of answer positions where the argmax tokens agree (strictly more than it).
        loss_ratio: the withdrawn answer loss may be at most this times the full model's.

    Returns:
        ``(B,)`` bool, True where withdrawal is safe.
    """
    positions = _answer_positions(labels)
    counts = positions.sum(1)
    if bool((counts == 0).any()):
        raise ValueError("every sample needs at least one answer token (labels != -100)")
    same = (full_logits.argmax(-1) == withdrawn_logits.argmax(-1)) & positions
    agreement = same.sum(1).float() / counts.float()
    return (agreement > agree) & (
        answer_loss(withdrawn_logits, labels) <= loss_ratio * answer_loss(full_logits, labels)
    )


def smallest_safe_layer(safe: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` safety at K = 0..L-1 -> ``(B,)`` the smallest K with every K' >= K safe (L if none is)."""
    num_layers = safe.shape[1]
    unsafe = torch.where(~safe, torch.arange(num_layers, device=safe.device), -1)  # (B, L)
    return unsafe.amax(1) + 1


def final_prompt_slot(labels: torch.Tensor) -> torch.Tensor:
    """``(B,)`` the slot before each row's first answer token."""
    return (labels != -100).long().argmax(1) - 1


def answer_argmax_equal(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: at every answer position the argmax is the teacher-forced answer token (greedy decoding under
    these logits would write exactly the labelled answer, end token included)."""
    positions = _answer_positions(labels)
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    wrong = (logits.argmax(-1) != targets) & positions
    return ~wrong.any(1)


def answer_kl(full_logits: torch.Tensor, withdrawn_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B,)`` mean over the answer positions of ``KL(P_withdrawn || P_full)`` in float32 (VTW's direction, as in
    :mod:`dyvte.calibrate`)."""
    positions = _answer_positions(labels)
    log_w = withdrawn_logits.float().log_softmax(-1)
    log_f = full_logits.float().log_softmax(-1)
    kl = (log_w.exp() * (log_w - log_f)).sum(-1)  # (B, T)
    return (kl * positions).sum(1) / positions.sum(1).clamp(min=1)
