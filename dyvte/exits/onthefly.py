"""The paper's on-the-fly labels for head training: one exit layer per sample, fresh at every step.

For a batch of B records, each sample draws an exit layer K_b in [1, L-1]; the batch is doubled (rows 0..B-1 the full
model, rows B..2B-1 withdrawn at their own K_b) and run in one forward with per-row exits
(``withdraw(model, layer=[L]*B + K)``). With the gold answer teacher-forced, the DyVTE rule
(:func:`dyvte.exits.labels.exit_safe`) on the two copies gives sample b's label for head K_b - 1, which reads the full
copy's layer K_b - 1 output (:func:`dyvte.policies.exit_heads.head_features`). Every other head gets no label from that
sample at that step (``mask``). This is the ``dyvte-layer`` label rule, one layer at a time;
``ExitLabelData(labels=LabelOptions(rule="dyvte-layer", on_the_fly=True))`` (``--data.labels.on_the_fly true``) trains
with it instead of a label cache, through the same records, and under DDP each rank labels its own records.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dyvte.data.records import build_inputs
from dyvte.engine.compat import hidden_states_of, logits_of
from dyvte.engine.registry import resolve, unwrap
from dyvte.exits.safety import exit_safe
from dyvte.policies.exit_heads import head_features
from dyvte.policies.withdraw import withdraw
from dyvte.utils.devices import model_device, to_device
from dyvte.utils.modes import eval_mode

__all__ = ["draw_layers", "fresh_labels"]


def draw_layers(num_layers: int, batch: int, generator: torch.Generator) -> list[int]:
    """``batch`` exit layers drawn uniformly from ``[1, L-1]`` (the layers a head can choose)."""
    return torch.randint(1, num_layers, (batch,), generator=generator).tolist()


@torch.no_grad()
def fresh_labels(
    model: nn.Module,
    processor,
    records: Sequence[dict],
    layers: Sequence[int],
    *,
    offset: int = 0,
    agree: float = 0.99,
    loss_ratio: float = 1.03,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Head inputs and one label per sample, at the sample's own exit layer, in one doubled forward.

    Args:
        model: the frozen MLLM.
        processor: its processor.
        records: records with ``image``, ``question``, ``answer``.
        layers: one exit layer K_b in ``[1, L-1]`` per record.
        offset: index of the first record (for error messages).
        agree: see :func:`dyvte.exits.labels.exit_safe`.
        loss_ratio: see :func:`dyvte.exits.labels.exit_safe`.

    Returns:
        ``features (B, L-1, 2d)`` every head's input, ``targets (B, L-1)`` float, ``mask (B, L-1)`` float: 1 only at
        head ``K_b - 1``, where ``targets`` holds the DyVTE rule's verdict for withdrawal at ``K_b``.
    """
    model = unwrap(model)
    spec = resolve(model)
    num_layers = spec.num_layers
    if len(layers) != len(records) or not all(1 <= int(k) < num_layers for k in layers):
        raise ValueError(f"fresh_labels: one exit layer in [1, {num_layers - 1}] per record expected, got {layers}")
    device = model_device(model)
    inputs = to_device(build_inputs(processor, records, with_answers=True, offset=offset, dtype=model.dtype), device)
    labels = inputs.pop("labels")  # (B, T)
    batch = labels.shape[0]
    doubled = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with eval_mode(model, "on-the-fly labels"), withdraw(model, layer=[num_layers] * batch + list(layers)) as handle:
        out = model(**doubled, output_hidden_states=True)
        logits = handle.to_input_positions(logits_of(out))  # (2B, T, V)
    states = hidden_states_of(out)
    safe = exit_safe(logits[:batch], logits[batch:], labels, agree, loss_ratio)  # (B,)
    visual = torch.isin(inputs["input_ids"], spec.visual_ids.to(device))  # (B, T)
    valid = inputs["attention_mask"].bool()
    final = (labels != -100).long().argmax(1) - 1  # (B,) the slot before each row's first answer token
    features = torch.stack(
        [head_features(states[j + 1][:batch], visual, valid, final) for j in range(num_layers - 1)], dim=1
    )  # (B, L-1, 2d): the full copies' states, unchanged by the other rows' exits
    heads = torch.tensor([int(k) - 1 for k in layers])
    mask = torch.zeros(batch, num_layers - 1)
    mask[torch.arange(batch), heads] = 1.0
    targets = torch.zeros(batch, num_layers - 1)
    targets[torch.arange(batch), heads] = safe.float().cpu()
    return features.float().cpu(), targets, mask
