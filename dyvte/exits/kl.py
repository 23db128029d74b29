"""VTW calibration: choose one static exit layer K by the KL criterion.

For every candidate K, the KL divergence ``KL(P_withdrawn || P_full)`` of the next-token distribution at the scored
positions (the first answer position, or every teacher-forced answer position), averaged per sample, then over
samples. The chosen K is the smallest whose mean KL is <= the threshold eta (VTW: 20 samples, eta = 3e-3 for
LLaVA-1.5-7B). K = L has KL 0 by construction, so "no K meets eta" means K = L: never withdraw.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dyvte.engine.compat import logits_of
from dyvte.engine.fingerprint import model_fingerprint
from dyvte.engine.registry import resolve, unwrap
from dyvte.policies.calibrated import POSITIONS, Calibration, choose_layer
from dyvte.policies.withdraw import withdraw
from dyvte.utils.devices import model_device, to_device
from dyvte.utils.modes import eval_mode

__all__ = ["calibrate", "kl_divergence", "scored_positions"]

logger = logging.getLogger(__name__)

#: a mean KL in (-KL_ROUNDING, 0) is float32 rounding of a zero divergence, and saved as 0 (a file refuses negatives)
KL_ROUNDING = 1e-5


def kl_divergence(logits_withdrawn: torch.Tensor, logits_full: torch.Tensor) -> torch.Tensor:
    """``KL(P_withdrawn || P_full)`` over the last axis, in float32: ``(..., V) -> (...)``."""
    log_w = torch.log_softmax(logits_withdrawn.float(), dim=-1)
    log_f = torch.log_softmax(logits_full.float(), dim=-1)
    return (log_w.exp() * (log_w - log_f)).sum(-1)


def _check_positions(positions: str) -> None:
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")


def scored_positions(batch: dict, positions: str) -> torch.Tensor:
    """``(B, T)`` bool: the positions whose next-token distribution is compared.

    ``"first"``: the last prompt position (left padding: column ``T - 1`` without labels; with labels, the position
    before the first answer token). ``"answer"``: every position that predicts a labelled token.
    """
    _check_positions(positions)
    ids = batch["input_ids"]
    labels = batch.get("labels")
    if labels is None:
        if positions != "first":
            raise ValueError("positions='answer' needs batches with labels (teacher-forced answers)")
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, -1] = True
        return mask
    predicts = torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1), value=False)  # (B, T): next token labelled
    if positions == "answer":
        return predicts
    if positions != "first":
        raise ValueError(f"positions must be 'first' or 'answer', got {positions!r}")
    first = predicts.long().argmax(1)  # (B,) first labelled prediction
    return torch.zeros_like(predicts).scatter_(1, first[:, None], True) & predicts.any(1, keepdim=True)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[dict],
    threshold: float = 3e-3,
    *,
    positions: str = "first",
    layers: Iterable[int] | None = None,
    progress: bool = True,
    processor: Any = None,
) -> Calibration:
    """Choose the static exit layer by the VTW KL criterion.

    Args:
        model: a supported model (run in eval mode; a model in training mode is switched, with a warning, and
            restored afterwards).
        batches: model-input dicts (``input_ids``, ``attention_mask``, pixel tensors, optionally ``labels`` marking
            teacher-forced answer tokens). Iterated once per candidate layer, so a list is best.
        threshold: eta > 0; the chosen K is the smallest whose mean KL <= eta.
        positions: ``"first"`` (first answer position, as VTW) or ``"answer"`` (every answer position).
        layers: candidate layers (default ``0..L``; L is always added).
        progress: show a progress bar over layers.
        processor: the model's processor, whose tokenizer and chat template the calibration's model fingerprint
            records too (the weights are always recorded).

    Returns:
        The :class:`Calibration`, with the whole KL curve (``nan`` for layers not scored) and the model's
        fingerprint (:func:`dyvte.engine.fingerprint.model_fingerprint`): applying it to another model is refused.
    """
    if not threshold > 0:
        raise ValueError(f"threshold eta must be > 0, got {threshold}")
    _check_positions(positions)
    model = unwrap(model)
    with eval_mode(model, "calibrate"):
        calibration = _calibrate(model, list(batches), threshold, positions, layers, progress)
    calibration.model_fingerprint = model_fingerprint(model, processor)
    return calibration


def _calibrate(
    model: nn.Module,
    batches: list[dict],
    threshold: float,
    positions: str,
    layers: Iterable[int] | None,
    progress: bool,
) -> Calibration:
    spec = resolve(model)
    num_layers = spec.num_layers
    if not batches:
        raise ValueError("calibration needs at least one batch")
    candidates = sorted(set(range(num_layers + 1) if layers is None else layers) | {num_layers})
    if candidates[0] < 0 or candidates[-1] > num_layers:
        raise ValueError(f"candidate layers must be in [0, {num_layers}]")

    full: list[torch.Tensor] = []  # per batch: (N_positions, V) full-model logits at the scored positions
    masks: list[torch.Tensor] = []
    device = model_device(model)
    batches = [to_device(batch, device) for batch in batches]  # once: every candidate layer reads them again
    model_inputs = [{k: v for k, v in batch.items() if k != "labels"} for batch in batches]
    for batch, inputs in zip(batches, model_inputs, strict=True):
        mask = scored_positions(batch, positions)
        full.append(logits_of(model(**inputs))[mask].float())
        masks.append(mask)
    rows = torch.cat([m.any(1) for m in masks])  # samples with at least one scored position
    num_samples = int(rows.sum())
    if num_samples == 0:
        raise ValueError("no sample has a scored position (are all labels -100?)")

    curve = [float("nan")] * (num_layers + 1)
    for layer in tqdm(candidates, desc="calibration (layers)", disable=not progress):
        per_sample = []
        for inputs, mask, reference in zip(model_inputs, masks, full, strict=True):
            with withdraw(model, layer=layer) as handle:
                logits = handle.to_input_positions(logits_of(model(**inputs)))  # (B, T, V)
            kl = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
            kl[mask] = kl_divergence(logits[mask], reference)
            count = mask.sum(1)
            per_sample.append((kl.sum(1) / count.clamp(min=1))[count > 0])  # mean over a sample's positions
        mean = float(torch.cat(per_sample).mean())
        curve[layer] = 0.0 if -KL_ROUNDING < mean < 0 else mean  # a KL is >= 0: a tiny negative is float32 rounding
    chosen, met = choose_layer(curve, threshold, num_layers)
    if not met:
        scored = [curve[k] for k in candidates if k < num_layers]
        logger.warning(
            "no exit layer K < %d has mean KL <= %.2g (smallest: %.3g): K = L, never withdraw",
            num_layers,
            threshold,
            min(scored) if scored else float("nan"),
        )
    return Calibration(
        layer=chosen,
        kl_per_layer=curve,
        threshold=threshold,
        num_samples=num_samples,
        positions=positions,
        model_type=spec.model_type,
        num_layers=num_layers,
        met=met,
    )
