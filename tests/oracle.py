"""The masking oracle: a full-length run in which layers >= K may not attend to visual keys.

Independent of dyvte's layout code: it only edits the mask each HF decoder layer receives. Withdrawal at K must give
the same text-position logits (docs/design.md §5, invariant 2).
"""

from __future__ import annotations

import torch

from dyvte.registry import resolve


def visual_mask(model, input_ids: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool: positions holding a visual placeholder id."""
    return torch.isin(input_ids, resolve(model).visual_ids)


@torch.no_grad()
def oracle_logits(model, inputs: dict, layer: int) -> torch.Tensor:
    """Full-length logits ``(B, T, V)`` of a run whose layers ``>= layer`` cannot see visual keys."""
    return masked_keys_logits(model, inputs, layer, visual_mask(model, inputs["input_ids"]))


@torch.no_grad()
def masked_keys_logits(model, inputs: dict, layer: int, blocked: torch.Tensor) -> torch.Tensor:
    """Full-length logits ``(B, T, V)`` of a run whose layers ``>= layer`` may not attend to the ``blocked`` keys.

    Args:
        blocked: ``(B, T)`` bool keys hidden from layers ``>= layer`` (withdrawal: every visual token; FastV: the
            pruned ones). A query still sees itself, which keeps its softmax finite.
    """
    spec = resolve(model)
    num_tokens = blocked.shape[1]

    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None:  # SDPA's implicit causal mask
            mask = torch.ones(num_tokens, num_tokens, dtype=torch.bool).tril()[None, None]
            mask = mask.expand(blocked.shape[0], 1, num_tokens, num_tokens)
        diag = torch.eye(num_tokens, mask.shape[-1], dtype=torch.bool)[None, None]
        block = blocked[:, None, None, :] & ~diag
        mask = mask & ~block if mask.dtype == torch.bool else mask.masked_fill(block, torch.finfo(mask.dtype).min)
        return args, {**kwargs, "attention_mask": mask}

    hooks = [spec.layers[i].register_forward_pre_hook(hook, with_kwargs=True) for i in range(layer, spec.num_layers)]
    try:
        return model(**inputs).logits
    finally:
        for h in hooks:
            h.remove()
