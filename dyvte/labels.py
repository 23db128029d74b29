"""DyVTE labels: is withdrawing at exit layer K safe for a sample?

The rule (DyVTE): with the ground-truth answer teacher-forced, withdrawal at K is safe when the withdrawn model's
argmax tokens agree with the full model's on more than ``agree`` (99%) of the answer positions AND its answer loss
is at most ``loss_ratio`` (1.03) times the full model's (``<=`` rather than ``<`` so that identical predictions are
always safe, even at zero loss).

Two ways to get labels:

* :func:`build_label_cache` (default for training): every K = 0..L-1 for every sample, plus the heads' inputs at every
  layer, computed once and stored with ``datasets``; head training afterwards never runs the MLLM.
* :func:`on_the_fly_labels` (as the paper did): one random K per step, full and withdrawn copies of the batch in one
  forward (per-row exit layers), one label per sample per step.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .checks import check_positive_int
from .data import build_inputs, iter_batches
from .heads import head_features
from .modes import eval_mode
from .registry import resolve, unwrap
from .withdraw import withdraw

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = ["answer_loss", "exit_safe", "smallest_safe_layer", "build_label_cache", "on_the_fly_labels"]

logger = logging.getLogger(__name__)


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


def _final_prompt_slot(labels: torch.Tensor) -> torch.Tensor:
    """``(B,)`` the slot before each row's first answer token."""
    return (labels != -100).long().argmax(1) - 1


@torch.no_grad()
def build_label_cache(
    model: nn.Module,
    processor,
    dataset,
    *,
    batch_size: int = 32,
    agree: float = 0.99,
    loss_ratio: float = 1.03,
    progress: bool = True,
) -> Dataset:
    """Labels at every exit layer and head inputs at every layer, once per sample.

    Args:
        model: the frozen MLLM.
        processor: its processor.
        dataset: records with ``image``, ``question``, ``answer`` (and ``qtype``).
        batch_size: rows per forward.
        agree: see :func:`exit_safe`.
        loss_ratio: see :func:`exit_safe`.
        progress: show a progress bar.

    Returns:
        A ``datasets.Dataset`` with columns ``features`` (``(L-1, 2d)`` float32: head j's input), ``safe``
        (``L`` bools: withdrawal at K = 0..L-1 is safe), ``safe_layer`` (smallest K with every K' >= K safe),
        ``qtype`` and ``index`` (row in ``dataset``).

    The model runs in eval mode (a model in training mode is switched, with a warning, and restored afterwards):
    dropout would make the labels and features random.
    """
    if len(dataset) == 0:
        raise ValueError("build_label_cache: the dataset is empty (no record to label)")
    check_positive_int("build_label_cache: batch_size", batch_size)
    with eval_mode(model, "build_label_cache (labelling)"):
        return _build_label_cache(model, processor, dataset, batch_size, agree, loss_ratio, progress)


def _build_label_cache(
    model: nn.Module, processor, dataset, batch_size: int, agree: float, loss_ratio: float, progress: bool
) -> Dataset:
    from datasets import Array2D, Dataset, Features, Sequence, Value  # lazy: only the label cache needs datasets

    model = unwrap(model)
    spec = resolve(model)
    num_layers, width = spec.num_layers, 2 * spec.text_config.hidden_size
    columns: dict[str, list] = {"features": [], "safe": [], "safe_layer": [], "qtype": [], "index": []}
    start_time = time.perf_counter()
    total = (len(dataset) + batch_size - 1) // batch_size
    for b, records in enumerate(
        tqdm(iter_batches(dataset, batch_size, answers=True), total=total, desc="labels", disable=not progress)
    ):
        inputs = build_inputs(processor, records, with_answers=True, offset=b * batch_size, dtype=model.dtype)
        labels = inputs.pop("labels")
        out = model(**inputs, output_hidden_states=True)
        visual = torch.isin(inputs["input_ids"], spec.visual_ids)
        valid = inputs["attention_mask"].bool()
        final = _final_prompt_slot(labels)
        features = torch.stack(
            [head_features(out.hidden_states[j + 1], visual, valid, final) for j in range(num_layers - 1)], dim=1
        )  # (B, L-1, 2d)
        safe = torch.ones(len(records), num_layers, dtype=torch.bool)
        for layer in range(num_layers):
            with withdraw(model, layer=layer) as handle:
                withdrawn = handle.to_input_positions(model(**inputs).logits)
            safe[:, layer] = exit_safe(out.logits, withdrawn, labels, agree, loss_ratio)
        columns["features"].extend(features.float().cpu().numpy())
        columns["safe"].extend(safe.tolist())
        columns["safe_layer"].extend(smallest_safe_layer(safe).tolist())
        columns["qtype"].extend(str(r.get("qtype", "all")) for r in records)
        columns["index"].extend(range(b * batch_size, b * batch_size + len(records)))
    elapsed = time.perf_counter() - start_time
    logger.info("labels for %d samples in %.1f s (%.1f ms/sample)", len(dataset), elapsed, 1e3 * elapsed / len(dataset))
    features = Features(
        {
            "features": Array2D((num_layers - 1, width), "float32"),
            "safe": Sequence(Value("bool"), length=num_layers),
            "safe_layer": Value("int32"),
            "qtype": Value("string"),
            "index": Value("int64"),
        }
    )
    columns["features"] = [np.asarray(f) for f in columns["features"]]
    return Dataset.from_dict(columns, features=features)


@torch.no_grad()
def on_the_fly_labels(
    model: nn.Module, inputs: dict, layer: int, agree: float = 0.99, loss_ratio: float = 1.03
) -> tuple[torch.Tensor, torch.Tensor]:
    """One exit layer's labels and head inputs, the paper's way: full and withdrawn copies in one forward.

    Args:
        model: the frozen MLLM.
        inputs: teacher-forced model inputs with ``labels`` (from ``dyvte.data.build_inputs(..., with_answers=True)``).
        layer: exit layer K in ``[1, L-1]`` (head ``K - 1``).
        agree: see :func:`exit_safe`.
        loss_ratio: see :func:`exit_safe`.

    Returns:
        ``(features (B, 2d), safe (B,))`` for head ``layer - 1``.

    The model runs in eval mode (a model in training mode is switched, with a warning, and restored afterwards).
    """
    with eval_mode(model, "on_the_fly_labels (labelling)"):
        return _on_the_fly_labels(unwrap(model), inputs, layer, agree, loss_ratio)


def _on_the_fly_labels(
    model: nn.Module, inputs: dict, layer: int, agree: float, loss_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    spec = resolve(model)
    if not 1 <= layer < spec.num_layers:
        raise ValueError(f"on-the-fly labels need an exit layer in [1, {spec.num_layers - 1}], got {layer}")
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    batch = labels.shape[0]
    # every tensor input (per-token or per-image) is repeated: rows 0..B-1 full, B..2B-1 withdrawn
    doubled = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    rows = [spec.num_layers] * batch + [layer] * batch  # first copy: full model, second: withdrawn at K
    with withdraw(model, layer=rows) as handle:
        out = model(**doubled, output_hidden_states=True)
        logits = handle.to_input_positions(out.logits)  # (2B, T, V)
    visual = torch.isin(inputs["input_ids"], spec.visual_ids)
    hidden = out.hidden_states[layer][:batch]  # output of layer K-1 for the full copies: (B, T, d)
    features = head_features(hidden, visual, inputs["attention_mask"].bool(), _final_prompt_slot(labels))
    return features, exit_safe(logits[:batch], logits[batch:], labels, agree, loss_ratio)
