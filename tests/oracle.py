"""The masking oracle: a full-length run in which layers >= K may not attend to visual keys.

Independent of dyvte's layout code: it only edits the mask each HF decoder layer receives. Withdrawal at K must give
the same text-position logits (docs/design.md §5, invariant 2). The rows-alone checks hold a batch to its other
oracle: each of its rows run by itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import dyvte
from dyvte.engine.registry import resolve


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

    # a recurrent (linear-attention) layer has no keys to hide: it keeps its 2-D padding mask (see
    # compacted_oracle_logits for what withdrawal means there)
    attention = [i for i in range(layer, spec.num_layers) if not (spec.linear_attention and spec.linear_attention[i])]
    hooks = [spec.layers[i].register_forward_pre_hook(hook, with_kwargs=True) for i in attention]
    try:
        return model(**inputs).logits
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def compacted_oracle_logits(
    model, inputs: dict, layer: int, keep: torch.Tensor | None = None, caches: list | None = None
) -> torch.Tensor:
    """The compacted oracle: layers ``>= layer`` run on each row's kept tokens as their whole input.

    The definition of withdrawal on linear-attention (recurrent) layers (docs/design.md, "Withdrawal on
    linear-attention layers (Qwen3.5)"): the unhooked model runs the embeddings and layers ``< layer`` on the full
    batch (the input of layer ``layer``, its rotary tables and position ids are captured by a plain forward pre-hook);
    then, row by row and without any padding, the kept positions are gathered and the decoder layers ``>= layer`` are
    called directly on them, with the original rotary positions (M-RoPE tables gathered, never recomputed), a causal
    mask built from scratch for the attention layers (bool for SDPA, additive for eager) and no mask for the
    recurrent ones (a row alone has no padding); final norm and LM head. Independent of dyvte's layout code.

    Args:
        keep: ``(B, T)`` bool, the tokens layers ``>= layer`` process (default: the attended non-visual tokens plus
            each row's final token).
        caches: one fresh transformers cache per row, or ``None``: when given, layers ``>= layer`` of row ``b`` write
            their state into ``caches[b]`` (the state of the kept sequence alone, which decoding continues from).

    Returns:
        ``(B, T, V)`` logits, ``nan`` at the positions that were not kept.
    """
    spec = resolve(model)
    mask_2d = inputs.get("attention_mask")
    input_ids = inputs["input_ids"]
    if keep is None:
        keep = ~visual_mask(model, input_ids)
        if mask_2d is not None:
            keep &= mask_2d.bool()
        keep[:, -1] = True
    if layer >= spec.num_layers:
        return model(**inputs).logits
    captured: dict = {}

    def capture(module, args, kwargs):
        captured.update(kwargs)
        captured["hidden_states"] = args[0] if args else kwargs["hidden_states"]

    hook = spec.layers[layer].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        full = model(**inputs).logits  # (B, T, V)
    finally:
        hook.remove()
    hidden = captured["hidden_states"]  # (B, T, D)
    cos, sin = captured["position_embeddings"]  # (B or 1, T, d)
    position_ids = captured.get("position_ids")  # (B, T) text positions, or None
    kind = spec.text_config._attn_implementation
    norm, head = spec.decoder.norm, model.get_output_embeddings()
    out = torch.full_like(full, float("nan"))
    for row in range(hidden.shape[0]):
        cols = keep[row].nonzero().squeeze(1)  # (n,)
        n = cols.numel()
        x = hidden[row : row + 1, cols]  # (1, n, D)
        rotary = (cos[min(row, cos.shape[0] - 1)][None, cols], sin[min(row, sin.shape[0] - 1)][None, cols])
        ids = None if position_ids is None else position_ids[min(row, position_ids.shape[0] - 1)][None, cols]
        causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]  # (1, 1, n, n)
        if kind == "eager":
            causal = torch.zeros(causal.shape, dtype=x.dtype).masked_fill(~causal, torch.finfo(x.dtype).min)
        for index in range(layer, spec.num_layers):
            linear = spec.text_config.layer_types[index] == "linear_attention"
            extra = {} if caches is None else {spec.names.layer_cache: caches[row]}
            x = spec.layers[index](
                x, position_embeddings=rotary, attention_mask=None if linear else causal, position_ids=ids, **extra
            )
            x = x[0] if isinstance(x, tuple) else x
        out[row, cols] = head(norm(x))[0]
    return out


def check_layers_equal_rows_alone(
    model,
    inputs: dict,
    alone: Callable[[int], dict],
    layers: int | list[int],
    generate: Callable[[object, dict], torch.Tensor],
) -> None:
    """A batch withdrawn at per-row ``layers`` (an int: every row at that layer) equals each row run alone at its own
    layer: the handle reports each row's layer, and the last position's logits and the greedy tokens of every row
    match. ``alone(row)`` encodes row ``row`` by itself; ``generate(model, inputs)`` returns the generated tokens."""
    rows = inputs["input_ids"].shape[0]
    per_row = layers if isinstance(layers, list) else [layers] * rows
    with dyvte.withdraw(model, layer=layers) as handle:
        with torch.no_grad():
            last = model(**inputs).logits[:, -1]
        tokens = generate(model, inputs)
        assert handle.exit_layers.tolist() == per_row
    for row, layer in enumerate(per_row):
        single = alone(row)
        with dyvte.withdraw(model, layer=layer), torch.no_grad():
            torch.testing.assert_close(model(**single).logits[:, -1], last[row : row + 1], atol=1e-5, rtol=1e-5)
            assert torch.equal(generate(model, single), tokens[row : row + 1]), f"row {row} differs"


def check_heads_rows_alone(
    model,
    inputs: dict,
    heads,
    alone: Callable[[int], dict],
    generate: Callable[[object, dict], torch.Tensor] | None = None,
) -> list[int]:
    """Under exit ``heads`` whose rows leave at different layers (asserted), every row of the batch equals the row run
    alone under the same heads: same exit layer, same last-position logits and (``generate`` given) the same greedy
    tokens. Returns the batch's exit layers."""
    with dyvte.withdraw(model, heads=heads) as handle:
        with torch.no_grad():
            last = model(**inputs).logits[:, -1]
        exits = handle.exit_layers.tolist()
        tokens = None if generate is None else generate(model, inputs)
        assert len(set(exits)) > 1, f"rows should leave at different layers, got {exits}"
        for row in range(inputs["input_ids"].shape[0]):
            single = alone(row)
            with torch.no_grad():
                torch.testing.assert_close(model(**single).logits[:, -1], last[row : row + 1], atol=1e-5, rtol=1e-5)
            assert handle.exit_layers.tolist() == [exits[row]]
            if generate is not None:
                assert torch.equal(generate(model, single), tokens[row : row + 1]), f"row {row} differs"
    return exits


def expected_kept(num: int, ratio: float) -> int:
    return max(1, int(num * (1 - ratio) + 0.5))


def check_fastv_equals_masking_oracle(model, inputs: dict, layer: int, ratio: float) -> None:
    """FastV keeps each row's budget of visual tokens and its logits are those of masking the pruned keys at >= K."""
    mask = inputs["attention_mask"].bool()
    visual = torch.isin(inputs["input_ids"], resolve(model).visual_ids) & mask
    with dyvte.prune(model, "fastv", layer=layer, ratio=ratio) as handle, torch.no_grad():
        logits = handle.to_input_positions(model(**inputs).logits)  # (B, T, V)
    budgets = [expected_kept(int(n), ratio) if n else 0 for n in visual.sum(1)]
    assert handle.visual_after.tolist() == budgets and handle.kept_visual.sum(1).tolist() == budgets
    assert not (handle.kept_visual & ~visual).any()
    dropped = visual & ~handle.kept_visual
    assert dropped.any()
    fed = mask & ~dropped  # text and kept visual positions: the ones FastV computes
    if any(resolve(model).linear_attention):  # recurrent layers: the compacted oracle (docs/design.md)
        oracle = compacted_oracle_logits
        reference, unpruned = oracle(model, inputs, layer, keep=fed), oracle(model, inputs, layer, keep=mask)
    else:
        reference = masked_keys_logits(model, inputs, layer, dropped)
        unpruned = masked_keys_logits(model, inputs, layer, torch.zeros_like(dropped))
    torch.testing.assert_close(logits[fed], reference[fed], atol=2e-6, rtol=1e-5)
    assert (unpruned[fed] - reference[fed]).abs().max() > 1e-3  # the oracle is not the unpruned model
    assert not model._forward_pre_hooks
