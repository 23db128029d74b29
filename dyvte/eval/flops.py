"""Analytic prefill FLOPs of the text decoder under withdrawal.

Two conventions, both counted per decoder layer for ``n`` tokens, hidden ``d``, FFN width ``m``:

* ``"detailed"`` (default): real FLOPs, 2 per multiply-add, of every matrix product: the q/k/v/o projections with
  grouped-query attention (k and v project to ``n_kv_heads * head_dim``), dense attention scores and weighted sum
  ``2 * 2 * n * n * heads * head_dim`` (a causal kernel may skip half; SDPA's math path and FlopCounterMode do not),
  the gated FFN ``2 * 3 * n * d * m``, and the LM head on ``lm_head_tokens`` positions. Norms, rotary and
  activations are ignored (elementwise, < 1%). This equals ``torch.utils.flop_counter.FlopCounterMode``'s count.
* ``"paper"``: the FastV/VTW-style multiply-add count ``4 n d^2 + 2 n^2 d + 3 n d m`` per layer (full MHA, gated FFN,
  no LM head), for comparison with published tables.

Mixture-of-experts decoders (Qwen3-VL-MoE: ``num_experts``, ``num_experts_per_tok``, ``moe_intermediate_size``,
``decoder_sparse_step``, ``mlp_only_layers``): a sparse layer's FFN is what runs, the router ``2 * n * d * E`` plus
``top_k`` routed experts per token ``2 * 3 * n * top_k * d * m_moe`` ("paper": ``3 * n * d * top_k * m_moe``, no
router). FlopCounterMode counts the same when the experts run as per-expert matmuls
(``experts_implementation="eager"``); transformers' default ``grouped_mm`` kernel is not counted by it (only the
router is). DeepStack's additions (Qwen3-VL) are elementwise and not counted, by either. GLM-4V-MoE
(``n_routed_experts``, ``n_shared_experts``, ``first_k_dense_replace``): its first layers are dense, and a sparse
layer also runs the shared experts, one MLP of width ``n_shared * m_moe`` on every token.

Hybrid decoders (Qwen3.5, docs/design.md §8 "Withdrawal on linear-attention layers (Qwen3.5)") are counted layer by
layer from ``layer_types``. A Gated DeltaNet (``"linear_attention"``) layer costs its projections (qkv, z, b, a, out),
its depthwise causal convolution (``2 * conv_dim * kernel * (n + kernel - 1)``: the padded output before the slice)
and transformers' chunked delta rule, whose matrix products run on the sequence padded to a multiple of the chunk
(64): ``N * H_v * (4 C d_k + 6 d_k d_v + 2 C d_v)`` for ``N`` padded tokens, chunk ``C``. Its two triangular solves
per chunk (``C^2 (d_k + d_v)`` per head and chunk) are real work that ``FlopCounterMode`` does not count
(:data:`NOT_COUNTED_BY_FLOP_COUNTER`; :func:`layer_flop_parts` splits a layer's count into its parts). A
full-attention layer with an output gate (Qwen3.5's ``q_proj`` is twice as wide) counts it; Qwen3.5-MoE's shared
expert (``shared_expert_intermediate_size``, with its 1-wide sigmoid gate) runs on every token. The ``"paper"``
convention describes full-attention decoders only and refuses hybrid ones.

Withdrawal at exit layer K: layers ``< K`` process all ``n`` tokens, layers ``>= K`` process ``n - n_visual``
(plus ``visual_after`` visual tokens that stay, as in FastV). Pruning before the LLM (FasterVLM, random) is counted by
passing the token and visual counts the LLM actually received; relative figures then need the unpruned model's
``full`` from a second call on the original counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dyvte.engine.registry import LINEAR_ATTENTION, family_of_config, layer_types

__all__ = [
    "NOT_COUNTED_BY_FLOP_COUNTER",
    "PrefillFlops",
    "layer_flop_parts",
    "layer_flops",
    "prefill_flops",
    "prefill_kv_bytes",
    "prefill_state_bytes",
    "relative_flops_per_exit",
]

NOT_COUNTED_BY_FLOP_COUNTER: tuple[str, ...] = ("triangular_solve",)
"""Parts of :func:`layer_flop_parts` that ``torch.utils.flop_counter.FlopCounterMode`` never counts (routed experts
are counted only when they run as per-expert matmuls, ``experts_implementation="eager"``; see above)."""

DELTA_RULE_CHUNK = 64  # transformers' torch_chunk_gated_delta_rule chunk size


@dataclass(frozen=True)
class PrefillFlops:
    """Prefill FLOPs of the text decoder, per row.

    Attributes:
        flops: FLOPs with withdrawal (``(B,)`` float64 tensor, or a float for scalar inputs).
        full: FLOPs of the unmodified model on the same rows.
        ratio: ``flops / full``.
        convention: ``"detailed"`` or ``"paper"`` (see module docstring).
    """

    flops: torch.Tensor | float
    full: torch.Tensor | float
    ratio: torch.Tensor | float
    convention: str


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _attention_dims(cfg) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of a text config (GQA-aware)."""
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return heads, kv_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads


def _rows(num_layers: int, num_tokens, num_visual, exit_layer, visual_after):
    """Checked float64 per-row counts ``(scalar, n, v, k, after)``; ``scalar`` when every input is a scalar."""
    scalar = all(
        not isinstance(x, torch.Tensor) or x.dim() == 0 for x in (num_tokens, num_visual, exit_layer, visual_after)
    )
    n = torch.as_tensor(num_tokens, dtype=torch.float64)
    v = torch.as_tensor(num_visual, dtype=torch.float64)
    after = torch.as_tensor(0 if visual_after is None else visual_after, dtype=torch.float64)
    k = torch.as_tensor(num_layers if exit_layer is None else exit_layer, dtype=torch.float64)
    if bool((v > n).any()) or bool((v < 0).any()):
        raise ValueError("num_visual must be in [0, num_tokens]")
    if bool((after < 0).any()) or bool((after > v).any()):
        raise ValueError("visual_after must be in [0, num_visual]")
    if bool((k < 0).any()) or bool((k > num_layers).any()):
        raise ValueError(f"exit_layer must be in [0, {num_layers}]")
    return scalar, n, v, k, after


def _experts(cfg) -> int:
    """Routed experts of a mixture-of-experts config (Qwen3-MoE: ``num_experts``; GLM-4V-MoE: ``n_routed_experts``)."""
    return getattr(cfg, "num_experts", None) or getattr(cfg, "n_routed_experts", None) or 0


def _sparse(cfg, index: int | None) -> bool:
    """Whether decoder layer ``index`` runs a routed mixture-of-experts FFN (Qwen3-MoE-style config fields, or
    GLM-4V-MoE's: dense below ``first_k_dense_replace``)."""
    if index is None or _experts(cfg) <= 0 or getattr(cfg, "moe_intermediate_size", None) is None:
        return False
    if index < (getattr(cfg, "first_k_dense_replace", None) or 0):
        return False
    step = getattr(cfg, "decoder_sparse_step", None) or 1
    return index not in (getattr(cfg, "mlp_only_layers", None) or []) and (index + 1) % step == 0


def _hybrid(cfg) -> bool:
    """Whether the decoder mixes linear-attention (recurrent) layers with attention ones (Qwen3.5)."""
    return LINEAR_ATTENTION in layer_types(cfg)


def _ffn_parts(cfg, n: torch.Tensor, index: int | None) -> dict[str, torch.Tensor]:
    """The FFN's matrix products: a gated FFN, or a routed mixture of experts (router, top-k experts, shared)."""
    d = cfg.hidden_size
    if not _sparse(cfg, index):
        return {"ffn": 2 * 3 * n * d * cfg.intermediate_size}  # gate, up, down
    expert_m = cfg.moe_intermediate_size
    parts = {"router": 2 * n * d * _experts(cfg), "routed_experts": 2 * 3 * n * cfg.num_experts_per_tok * d * expert_m}
    shared = getattr(cfg, "n_shared_experts", None) or 0  # GLM-4V-MoE: an always-on MLP of shared * m_moe
    if shared:
        parts["shared_experts"] = 2 * 3 * n * d * shared * expert_m
    shared_width = getattr(cfg, "shared_expert_intermediate_size", None) or 0  # Qwen3.5-MoE: a gated shared expert
    if shared_width:
        parts["shared_expert"] = 2 * 3 * n * d * shared_width + 2 * n * d  # its FFN and its 1-wide sigmoid gate
    return parts


def _linear_attention_parts(cfg, n: torch.Tensor) -> dict[str, torch.Tensor]:
    """A Gated DeltaNet mixer (transformers' torch reference kernels) on ``n`` tokens."""
    d = cfg.hidden_size
    key_heads, value_heads = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv, kernel = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim
    key_dim, value_dim = key_heads * dk, value_heads * dv
    conv_dim = 2 * key_dim + value_dim
    chunk = DELTA_RULE_CHUNK
    padded = torch.ceil(n / chunk) * chunk  # the chunked rule pads the sequence to whole chunks
    projections = 2 * n * d * (conv_dim + value_dim + 2 * value_heads) + 2 * n * value_dim * d  # qkv, z, b, a; out
    return {
        "projections": projections,
        "conv": torch.where(n > 0, 2 * conv_dim * kernel * (n + kernel - 1), 0.0),
        # per chunk and value head: k_beta k^T and q k^T (2 C^2 d_k each), then the scan: 3 (C x d_k)(d_k x d_v)
        # products and one (C x C)(C x d_v)
        "delta_rule": padded * value_heads * (4 * chunk * dk + 6 * dk * dv + 2 * chunk * dv),
        "triangular_solve": padded * value_heads * chunk * (dk + dv),  # two unit-lower solves per chunk
    }


def _attention_parts(cfg, n: torch.Tensor, gated: bool) -> dict[str, torch.Tensor]:
    d = cfg.hidden_size
    heads, kv_heads, head_dim = _attention_dims(cfg)
    q_width = heads * head_dim * (2 if gated else 1)  # a gated q_proj also outputs the output gate
    return {
        "projections": 2 * n * d * q_width + 2 * n * heads * head_dim * d + 2 * (2 * n * d * kv_heads * head_dim),
        "attention": 2 * (2 * n * n * heads * head_dim),  # scores and weighted sum
    }


def layer_flop_parts(config, num_tokens, index: int | None = None) -> dict[str, torch.Tensor]:
    """The ``"detailed"`` FLOPs of decoder layer ``index`` on ``num_tokens`` tokens, by part (float64 tensors).

    Parts: ``projections`` and ``attention`` (an attention layer), or ``projections``, ``conv``, ``delta_rule`` and
    ``triangular_solve`` (a Gated DeltaNet layer); then ``ffn``, or ``router``, ``routed_experts`` and the shared
    experts (a routed mixture of experts). ``index`` ``None``: a dense attention layer. See the module docstring and
    :data:`NOT_COUNTED_BY_FLOP_COUNTER`.
    """
    cfg = _text_config(config)
    n = torch.as_tensor(num_tokens, dtype=torch.float64)
    if index is not None and layer_types(cfg)[index] == LINEAR_ATTENTION:
        mixer = _linear_attention_parts(cfg, n)
    else:
        family = family_of_config(config) or family_of_config(cfg)
        mixer = _attention_parts(cfg, n, gated=family is not None and family.gated_query)
    ffn = _ffn_parts(cfg, n, index)
    return {**mixer, **ffn}


def layer_flops(
    config, num_tokens: torch.Tensor, convention: str = "detailed", index: int | None = None
) -> torch.Tensor:
    """FLOPs of decoder layer ``index`` on ``num_tokens`` tokens (float64 tensor, elementwise); ``index`` matters
    only for mixture-of-experts and hybrid decoders (``None``: a dense attention layer)."""
    cfg = _text_config(config)
    n = torch.as_tensor(num_tokens, dtype=torch.float64)
    if convention == "paper":
        if _hybrid(cfg):
            raise ValueError(
                "the 'paper' convention (4nd^2 + 2n^2d + 3ndm) describes full-attention layers only; this decoder "
                "has linear-attention layers: use convention='detailed'"
            )
        d = cfg.hidden_size
        if _sparse(cfg, index):
            shared = getattr(cfg, "n_shared_experts", None) or 0  # GLM-4V-MoE: an always-on MLP of shared * m_moe
            m = (cfg.num_experts_per_tok + shared) * cfg.moe_intermediate_size  # the experts a token runs
        else:
            m = cfg.intermediate_size
        return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m
    if convention != "detailed":
        raise ValueError(f"convention must be 'detailed' or 'paper', got {convention!r}")
    return sum(layer_flop_parts(config, n, index).values())


def prefill_flops(
    config,
    num_tokens,
    num_visual,
    exit_layer=None,
    *,
    convention: str = "detailed",
    lm_head_tokens: int = 1,
    visual_after=None,
) -> PrefillFlops:
    """Prefill FLOPs of the text decoder for rows withdrawn at ``exit_layer``.

    Args:
        config: the model config (multimodal or text).
        num_tokens: tokens in the row (padding excluded); int or ``(B,)`` tensor.
        num_visual: visual tokens in the row; int or ``(B,)`` tensor.
        exit_layer: exit layer K in ``[0, L]`` (``None`` or ``L`` = never withdraw); int or ``(B,)`` tensor.
        convention: ``"detailed"`` (real FLOPs, GQA, LM head) or ``"paper"`` (see module docstring).
        lm_head_tokens: positions the LM head runs on (``generate`` uses 1); ignored by ``"paper"``.
        visual_after: visual tokens that stay in layers ``>= exit_layer`` (FastV keeps the top ones); int or ``(B,)``
            tensor in ``[0, num_visual]``; default 0 (all withdrawn).

    Returns:
        :class:`PrefillFlops` with per-row FLOPs, the full model's FLOPs and their ratio.
    """
    cfg = _text_config(config)
    num_layers = cfg.num_hidden_layers
    scalar, n, v, k, after = _rows(num_layers, num_tokens, num_visual, exit_layer, visual_after)
    head = 0.0 if convention == "paper" else 2.0 * lm_head_tokens * cfg.hidden_size * cfg.vocab_size
    if not _hybrid(cfg) and not any(_sparse(cfg, index) for index in range(num_layers)):
        full = num_layers * layer_flops(cfg, n, convention) + head
        late = layer_flops(cfg, n - v + after, convention)  # each layer >= K
        withdrawn = k * layer_flops(cfg, n, convention) + (num_layers - k) * late + head
    else:  # layers differ (dense / routed FFN, linear / full attention): sum them
        full = withdrawn = head
        for index in range(num_layers):
            every = layer_flops(config, n, convention, index)
            full = full + every
            late = layer_flops(config, n - v + after, convention, index)
            withdrawn = withdrawn + torch.where(k > index, every, late)
    ratio = withdrawn / full
    if scalar:
        return PrefillFlops(float(withdrawn), float(full), float(ratio), convention)
    return PrefillFlops(withdrawn, full, ratio, convention)


def relative_flops_per_exit(config, num_tokens, num_visual) -> torch.Tensor:
    """``(B, L+1)`` float64: each row's prefill FLOPs at exit layer K = 0..L relative to its full model (detailed).

    Args:
        config: the model config (multimodal or text).
        num_tokens: ``(B,)`` tokens per row (padding excluded).
        num_visual: ``(B,)`` visual tokens per row.
    """
    tokens, visual = torch.as_tensor(num_tokens), torch.as_tensor(num_visual)
    num_layers = _text_config(config).num_hidden_layers
    full = prefill_flops(config, tokens, visual).full
    per_exit = [
        prefill_flops(config, tokens, visual, torch.full_like(tokens, k)).flops / full for k in range(num_layers + 1)
    ]
    return torch.stack(per_exit, dim=1).double()  # (B, L+1)


def prefill_kv_bytes(
    config, num_tokens, num_visual, exit_layer=None, *, visual_after=None, bytes_per_value: int = 4
) -> torch.Tensor | float:
    """Bytes of keys and values the decoder caches for one row after its prefill, under withdrawal.

    Layers ``< K`` hold all ``n`` tokens, layers ``>= K`` hold ``n - n_visual + visual_after`` (the tokens they
    processed); each token costs ``2 * n_kv_heads * head_dim`` values per layer. A sliding-window layer (Gemma3's
    ``layer_types``) holds at most ``sliding_window - 1`` tokens, as transformers' sliding cache layers do. Padding
    is excluded (a batched cache also stores the pad columns of the widest row), so this is the per-sample figure
    that batching cannot blur; the tests check it against the bytes of a real ``DynamicCache``. Linear-attention
    layers hold no keys or values (their fixed-size state: :func:`prefill_state_bytes`).

    Args:
        config: the model config (multimodal or text).
        num_tokens: tokens in the row (padding excluded); int or ``(B,)`` tensor.
        num_visual: visual tokens in the row; int or ``(B,)`` tensor.
        exit_layer: exit layer K in ``[0, L]`` (``None`` = never withdraw); int or ``(B,)`` tensor.
        visual_after: visual tokens that stay in layers ``>= K`` (FastV); default 0.
        bytes_per_value: 4 for fp32, 2 for bf16.

    Returns:
        Bytes per row: a float for scalar inputs, else a ``(B,)`` float64 tensor.
    """
    cfg = _text_config(config)
    num_layers = cfg.num_hidden_layers
    scalar, n, v, k, after = _rows(num_layers, num_tokens, num_visual, exit_layer, visual_after)
    _, kv_heads, head_dim = _attention_dims(cfg)
    per_token = 2 * kv_heads * head_dim * bytes_per_value
    window = getattr(cfg, "sliding_window", None)
    total = torch.zeros_like(n + v + k + after)
    for index, kind in enumerate(layer_types(cfg)):
        if kind == LINEAR_ATTENTION:
            continue  # no keys or values: a fixed-size state (prefill_state_bytes)
        held = torch.where(k > index, n, n - v + after)
        if kind == "sliding_attention" and window:
            held = held.clamp(max=window - 1)  # transformers' sliding layers keep the last window - 1 entries
        total = total + held * per_token
    return float(total) if scalar else total


def prefill_state_bytes(config, *, bytes_per_value: int = 4, state_bytes_per_value: int = 4) -> int:
    """Bytes of the recurrent and convolution states the linear-attention layers cache for one row.

    Each Gated DeltaNet layer keeps a recurrent state of ``H_v * d_k * d_v`` values (transformers' torch kernels
    compute and cache it in fp32 whatever the model dtype: ``state_bytes_per_value`` 4) and a convolution state of the
    last ``kernel`` inputs of its depthwise convolution, ``(2 H_k d_k + H_v d_v) * kernel`` values in the model dtype
    (``bytes_per_value``). Neither depends on the sequence length, so withdrawal does not shrink them: only the KV
    cache of the full-attention layers shrinks (:func:`prefill_kv_bytes`). ``0`` for a decoder without such layers.
    """
    cfg = _text_config(config)
    linear = sum(kind == LINEAR_ATTENTION for kind in layer_types(cfg))
    if not linear:
        return 0
    key_heads, value_heads = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv, kernel = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim
    conv = (2 * key_heads * dk + value_heads * dv) * kernel * bytes_per_value
    recurrent = value_heads * dk * dv * state_bytes_per_value
    return linear * (conv + recurrent)
