"""DyVTE exit heads: one small network per decoder layer that reads the text tokens' state and says "exit now".

Layer convention: head ``j`` (``j = 0..L-2``) reads the output of decoder layer ``j``; when it fires for a row, that
row's exit layer is ``K = j + 1`` (layers ``0..j`` saw every token). A head after the last layer would save nothing,
so there are ``L - 1`` heads. At inference the first head whose P(exit) >= threshold decides; if none fires, nothing
is withdrawn.

Input of head ``j`` (docs/design.md §2): the concatenation of the mean hidden state of the non-visual tokens that
follow the row's last visual token (excluding the final prompt token) and the final prompt token's hidden state,
``(B, 2d)``. Heads with ``visual_inputs`` also read the visual tokens at the same layer, pooled: their mean and
their elementwise max (``(B, 4d)`` in all; docs/design.md §2).
Each head is ``LayerNorm(2d) -> Linear(2d, h) -> GELU -> Linear(h, 1)``; by default ``h = max(128, d // 32)``, about
0.5% of a 7B decoder's parameters (the original 2d->2048->2 per layer is 8%); the floor of 128 makes them relatively
bigger on small decoders (14% of the 1.7 M demo decoder, still 0.3% of its prefill FLOPs). Heads fire on logits
(:func:`dyvte.policies.exit_heads.first_exit`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dyvte.engine.fingerprint import check_fingerprint, model_fingerprint
from dyvte.engine.registry import resolve
from dyvte.policies.shift import check_reference
from dyvte.utils.io import atomic_path

__all__ = [
    "EXTRA_COLUMNS",
    "EXTRA_WIDTH",
    "FORMAT_VERSION",
    "ExitHeads",
    "ExitHeadsConfig",
    "NEVER",
    "exit_logit",
    "first_exit",
    "head_features",
    "head_inputs",
    "visual_pool",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: extra head inputs (ablation) and their widths: columns of a label cache's ``extras`` (see ``ExitHeadsConfig``)
EXTRA_WIDTH = {"lens": 2, "attn": 1}
EXTRA_COLUMNS = {"lens": [0, 1], "attn": [2]}
CONFIG_NAME = "exit_heads_config.json"
WEIGHTS_NAME = "exit_heads.safetensors"


#: the threshold of a head that must never fire (a probability never reaches it)
NEVER = 1.0 + 2.0**-20  # exactly representable in float32


def exit_logit(threshold: float | torch.Tensor) -> torch.Tensor:
    """The logit of a P(exit) threshold, in float64: ``sigmoid(x) >= p`` exactly when ``x >= exit_logit(p)``
    (``p >= 1``: ``+inf``, never fires; ``p <= 0``: ``-inf``, always fires)."""
    p = torch.as_tensor(threshold, dtype=torch.float64)
    return torch.where(p >= 1.0, math.inf, torch.where(p <= 0.0, -math.inf, torch.log(p) - torch.log1p(-p)))


def first_exit(logits: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``(N,)`` exit layer: ``j + 1`` for the first head with ``logits[:, j] >= thresholds[j]``, else ``L``.

    Heads fire on logits, not on probabilities: a float32 sigmoid rounds every logit above ~17 to exactly 1.0, which
    would tie a confident head's top samples with each other and with a threshold near 1. The engine compares the
    same float32 values (:class:`dyvte.policies.learned.LearnedExit`).

    Args:
        logits: ``(N, L-1)`` exit logits of each head.
        thresholds: ``(L-1,)`` per-head logit thresholds (``+inf``: never fires; :meth:`ExitHeads.exit_logits`).
    """
    fires = logits.float() >= thresholds.to(logits.device).float()[None]  # (N, L-1)
    num_heads = logits.shape[1]
    first = torch.where(fires, torch.arange(num_heads, device=logits.device)[None], num_heads).amin(1)
    return first + 1  # L - 1 + 1 = L when no head fires


def visual_pool(hidden: torch.Tensor, visual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(B, 2d)``: [mean ; elementwise max] of each row's visual tokens' states (zeros for a row without any).

    Args:
        hidden: ``(B, T, d)`` hidden states after a decoder layer.
        visual: ``(B, T)`` bool, slot holds a visual token.
        valid: ``(B, T)`` bool, slot holds a real token (not padding).
    """
    slots = visual & valid  # (B, T)
    count = slots.sum(1, keepdim=True)  # (B, 1)
    mean = (hidden * slots[..., None].to(hidden.dtype)).sum(1) / count.clamp(min=1).to(hidden.dtype)  # (B, d)
    lowest = torch.finfo(hidden.dtype).min
    peak = hidden.masked_fill(~slots[..., None], lowest).amax(1)  # (B, d)
    peak = torch.where(count > 0, peak, torch.zeros_like(peak))
    return torch.cat([mean, peak], dim=-1)


def head_features(
    hidden: torch.Tensor,
    visual: torch.Tensor,
    valid: torch.Tensor,
    final: torch.Tensor | None = None,
    visual_inputs: bool = False,
) -> torch.Tensor:
    """The exit heads' input for each row.

    Args:
        hidden: ``(B, T, d)`` hidden states after a decoder layer.
        visual: ``(B, T)`` bool, slot holds a visual token.
        valid: ``(B, T)`` bool, slot holds a real token (not padding).
        final: ``(B,)`` slot of each row's final prompt token (default: the last slot, as in prefill; a
            teacher-forced sequence passes the slot before its answer).
        visual_inputs: append the visual tokens' pooled states (:func:`visual_pool`).

    Returns:
        ``(B, 2d)``: [mean of the non-visual tokens after the last visual token and before the final prompt token
        (zeros when there are none) ; the final prompt token's state]; ``(B, 4d)`` with ``visual_inputs``:
        [... ; mean of the visual tokens ; their elementwise max].
    """
    batch, num_slots = hidden.shape[:2]
    if final is None:
        final = torch.full((batch,), num_slots - 1, dtype=torch.long, device=hidden.device)
    slots = torch.arange(num_slots, device=hidden.device)[None]  # (1, T)
    last_visual = torch.where(visual, slots, -1).amax(dim=1)  # (B,), -1 when the row has no visual token
    text = valid & ~visual & (slots > last_visual[:, None]) & (slots < final[:, None])  # (B, T)
    weights = text.to(hidden.dtype)
    mean = (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)  # (B, d)
    parts = [mean, hidden[torch.arange(batch, device=hidden.device), final]]
    if visual_inputs:
        parts.append(visual_pool(hidden, visual, valid))
    return torch.cat(parts, dim=-1)


def head_inputs(columns, extra_inputs: list[str] | None = None, visual_inputs: bool = False) -> torch.Tensor:
    """``(N, L-1, width)`` float32 head inputs from a label cache's columns: ``features``, with ``visual_inputs``
    the ``visual_features`` column after them, then the named ``extras`` (see :class:`ExitHeadsConfig`).

    Raises:
        ValueError: ``visual_inputs`` and a label cache without ``visual_features``.
    """
    inputs = torch.as_tensor(columns["features"], dtype=torch.float32)
    if visual_inputs:
        if "visual_features" not in columns:
            raise ValueError(
                "these exit heads read the visual tokens' pooled states, and the label cache has no visual_features "
                "column: label with --data.labels.visual_inputs true (build_label_cache(..., visual_inputs=True))"
            )
        inputs = torch.cat([inputs, torch.as_tensor(columns["visual_features"], dtype=torch.float32)], dim=-1)
    if extra_inputs:
        extras = torch.as_tensor(columns["extras"], dtype=torch.float32)
        picked = [extras[..., EXTRA_COLUMNS[name]] for name in extra_inputs]
        inputs = torch.cat([inputs, *picked], dim=-1)
    return inputs


@dataclass
class ExitHeadsConfig:
    """Everything that defines a set of exit heads, saved as JSON next to their weights.

    Attributes:
        model_type: the base model's ``config.model_type``.
        hidden_size: the base decoder's hidden size d.
        num_layers: the base decoder's layer count L (there are L - 1 heads).
        head_size: hidden width h of each head (``None``: ``max(128, d // 32)``).
        threshold: P(exit) threshold at inference when no calibrated ``thresholds`` are saved.
        format_version: version of this file format.
        thresholds: calibrated P(exit) threshold of each head (``L - 1`` values), chosen by
            :func:`dyvte.exits.rules.certify_thresholds` on held-out data; used by default at inference when set
            (through ``threshold_logits`` when those are saved too).
        threshold_logits: the calibrated thresholds as logits, what the heads fire on (``null``: a head that never
            fires); exact where a P(exit) threshold would round to 1.0.
        calibration: how ``thresholds`` were chosen (tolerance, delta, calibration size, label rule, the measured
            disagreement on the calibration data, ...), for the record.
        label_rule: the label rule the heads were trained on.
        extra_inputs: extra per-layer inputs appended to the ``2d`` features, from a label cache's ``extras``
            (``"lens"``: the final prompt token's logit-lens top-1 probability and entropy; ``"attn"``: its
            attention mass on the visual tokens). For the ablation in docs/report.md only: the engine computes the
            ``2d`` features alone, so heads with extra inputs are scored offline (:mod:`dyvte.exits.rules`) and refused
            by ``withdraw``.
        model_fingerprint: the fingerprint of the model the heads were trained on
            (:func:`dyvte.engine.fingerprint.model_fingerprint`, recorded in the label cache that trained them):
            :meth:`ExitHeads.check_model` refuses any other model unless told to allow it. ``None`` (heads saved
            before fingerprints): accepted with a warning that the model cannot be checked.
        score_reference: the calibration distribution of each head's logits over the calibration records that reach
            it at the certified thresholds (:func:`dyvte.policies.shift.score_reference`: quantiles and counts), what
            ``withdraw(heads=...).shift_report()`` tests the scores seen at use time against; ``None``: heads saved
            before it existed (no shift check).
        layer_change: each head also reads how the features changed since the previous head's layer (head j's
            features minus head j - 1's; head 0's own features, against zeros), so that it sees whether the text
            tokens are still taking in the image (docs/guide.md, "Toward 75%").
        members: how many independently trained sets of heads these are the average of (:meth:`ExitHeads.average`:
            each head's logit is the mean of the members' logits, folded into one head of ``head_size`` = the sum of
            the members' widths); 1: heads trained alone. For the record: the heads run the same either way.
        visual_inputs: each head also reads the visual tokens' states at its layer, pooled (their mean and
            elementwise max, :func:`visual_pool`; ``4d`` features): what the image still holds that the text tokens
            have not taken in. Labelled with ``--data.labels.visual_inputs true`` (the label cache's
            ``visual_features``); ``withdraw`` computes them at run time (docs/guide.md, "Heads that see the image").
    """

    model_type: str
    hidden_size: int
    num_layers: int
    head_size: int | None = None
    threshold: float = 0.5
    format_version: int = FORMAT_VERSION
    thresholds: list[float] | None = None
    calibration: dict | None = None
    label_rule: str | None = None
    extra_inputs: list[str] | None = None
    threshold_logits: list[float | None] | None = None
    model_fingerprint: dict | None = None
    score_reference: dict | None = None
    layer_change: bool = False
    members: int = 1
    visual_inputs: bool = False

    @property
    def feature_size(self) -> int:
        """Width of one layer's features: ``2d`` (``4d`` with ``visual_inputs``) plus the extra inputs."""
        text = 2 * self.hidden_size * (2 if self.visual_inputs else 1)
        return text + sum(EXTRA_WIDTH[name] for name in self.extra_inputs or [])

    @property
    def input_size(self) -> int:
        """Width of each head's input: the layer's features, and with ``layer_change`` their change since the
        previous head's layer too."""
        return self.feature_size * (2 if self.layer_change else 1)

    def __post_init__(self) -> None:
        if self.head_size is None:
            self.head_size = max(128, self.hidden_size // 32)
        if self.num_layers < 2:
            raise ValueError("exit heads need a decoder of at least 2 layers")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.model_fingerprint is not None and not isinstance(self.model_fingerprint, dict):
            raise ValueError(f"model_fingerprint must be a dict or null, got {self.model_fingerprint!r:.80}")
        if self.score_reference is not None:
            check_reference(self.score_reference, self.num_layers - 1)
        if not isinstance(self.layer_change, bool):
            raise ValueError(f"layer_change must be true or false, got {self.layer_change!r:.80}")
        if not isinstance(self.visual_inputs, bool):
            raise ValueError(f"visual_inputs must be true or false, got {self.visual_inputs!r:.80}")
        if isinstance(self.members, bool) or not isinstance(self.members, int) or self.members < 1:
            raise ValueError(f"members must be a positive integer, got {self.members!r:.80}")
        unknown = sorted(set(self.extra_inputs or []) - set(EXTRA_WIDTH))
        if unknown:
            raise ValueError(f"extra_inputs: unknown {unknown}; known: {sorted(EXTRA_WIDTH)}")
        if self.thresholds is not None:
            if len(self.thresholds) != self.num_layers - 1:
                raise ValueError(
                    f"thresholds: one per head ({self.num_layers - 1}) expected, got {len(self.thresholds)}"
                )
            bad = [t for t in self.thresholds if not isinstance(t, (int, float)) or not 0.0 <= t <= NEVER]
            if bad:
                raise ValueError(f"thresholds must be in [0, 1] ({NEVER}: a head that never fires), got {bad}")
        if self.threshold_logits is not None:
            if len(self.threshold_logits) != self.num_layers - 1:
                raise ValueError(
                    f"threshold_logits: one per head ({self.num_layers - 1}) expected, got {len(self.threshold_logits)}"
                )
            bad = [
                t
                for t in self.threshold_logits
                if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t))
            ]
            if bad:
                raise ValueError(f"threshold_logits must be finite numbers or null (never fires), got {bad}")
            if self.thresholds is not None:  # the P(exit) copy is for reading: it must say what the logits fire on
                off = [
                    j
                    for j, (t, x) in enumerate(zip(self.thresholds, self.threshold_logits, strict=True))
                    if ((t < 1.0) if x is None else abs(t - 0.5 * (1.0 + math.tanh(x / 2.0))) > 1e-9)
                ]
                if off:
                    raise ValueError(
                        f"thresholds and threshold_logits disagree at heads {off}: the heads fire on "
                        "threshold_logits; edit both, or remove threshold_logits to use thresholds"
                    )


class ExitHeads(nn.Module):
    """The L - 1 exit heads of one base model (see the module docstring for conventions)."""

    def __init__(self, config: ExitHeadsConfig) -> None:
        super().__init__()
        self.config = config
        self.name_or_path: str | None = None  # the directory it was loaded from (names it in tables)
        self.logged: set[str] = set()  # the model-check warnings already logged for these heads
        width, h = config.input_size, config.head_size
        self.heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, h), nn.GELU(), nn.Linear(h, 1))
            for _ in range(config.num_layers - 1)
        )

    @classmethod
    def for_model(
        cls, model: nn.Module, head_size: int | None = None, threshold: float = 0.5, processor: object = None
    ) -> ExitHeads:
        """Fresh heads shaped for ``model``, carrying its fingerprint (with ``processor``: its tokenizer's too)."""
        spec = resolve(model)
        cfg = ExitHeadsConfig(spec.model_type, spec.text_config.hidden_size, spec.num_layers, head_size, threshold)
        cfg.model_fingerprint = model_fingerprint(model, processor)
        return cls(cfg)

    @classmethod
    def average(cls, members: list[ExitHeads]) -> ExitHeads:
        """One set of heads whose logits are the mean of ``members``' logits (an ensemble, folded exactly).

        Each member's head is ``LayerNorm -> Linear -> GELU -> Linear``. The members' LayerNorm scales and shifts
        are folded into their first linear layers, which are stacked (width: the sum of the members' widths), and the
        output layer averages: ``mean_i(w2_i . GELU(W1_i (g_i * n(x) + b_i) + c1_i) + c2_i)`` with ``n`` the shared
        normalisation. The result is an ordinary :class:`ExitHeads` (saved, loaded and run like any other), equal to
        the members' mean logit up to float rounding. Thresholds, calibration and score reference are not carried
        over: certify the average.

        Raises:
            ValueError: no members, or members of different models, inputs, layer norms or label rules.
        """
        if not members:
            raise ValueError("average() needs at least one set of exit heads")
        first = members[0].config
        shape = ("model_type", "hidden_size", "num_layers", "extra_inputs", "layer_change", "visual_inputs")
        shape += ("label_rule",)
        for other in members[1:]:
            diff = [k for k in shape if getattr(other.config, k) != getattr(first, k)]
            if diff:
                raise ValueError(f"exit heads to average differ in {', '.join(diff)}: they are not of one model")
        eps = {m.heads[j][0].eps for m in members for j in range(m.num_heads)}
        if len(eps) != 1:
            raise ValueError(f"exit heads to average use different LayerNorm eps {sorted(eps)}")
        config = ExitHeadsConfig(
            first.model_type,
            first.hidden_size,
            first.num_layers,
            head_size=sum(m.config.head_size for m in members),
            threshold=first.threshold,
            label_rule=first.label_rule,
            extra_inputs=first.extra_inputs,
            model_fingerprint=first.model_fingerprint,
            layer_change=first.layer_change,
            visual_inputs=first.visual_inputs,
            members=sum(m.config.members for m in members),
        )
        (norm_eps,) = eps
        out = cls(config)
        total = config.members
        with torch.no_grad():
            for j, head in enumerate(out.heads):
                norm, first_linear, _, last_linear = head
                norm.eps = norm_eps
                norm.weight.fill_(1.0)
                norm.bias.zero_()
                weights, biases, outs = [], [], []
                for m in members:
                    m_norm, m_first, _, m_last = m.heads[j]
                    g, b = m_norm.weight.double(), m_norm.bias.double()  # (w,)
                    w1 = m_first.weight.double()  # (h_i, w)
                    weights.append(w1 * g[None])
                    biases.append(w1 @ b + m_first.bias.double())
                    # a member that is itself an average of n members weighs n / total
                    outs.append(m_last.weight.double() * (m.config.members / total))
                first_linear.weight.copy_(torch.cat(weights))
                first_linear.bias.copy_(torch.cat(biases))
                last_linear.weight.copy_(torch.cat(outs, dim=1))
                last_linear.bias.copy_(sum(m.heads[j][3].bias.double() * (m.config.members / total) for m in members))
        return out.eval()

    @property
    def num_heads(self) -> int:
        """L - 1."""
        return len(self.heads)

    def layer_logits(self, head: int, features: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """Exit logit of head ``head`` for ``(B, w)`` features: ``(B,)``. ``previous``: head ``head - 1``'s ``(B, w)``
        features of the same rows, read by heads with ``layer_change`` (``None`` for head 0: zeros)."""
        if self.config.layer_change:
            if previous is None:
                if head != 0:
                    raise ValueError(f"head {head} reads the change since head {head - 1}: pass its features")
                previous = torch.zeros_like(features)
            features = torch.cat([features, features - previous], dim=-1)
        return self.heads[head](features.to(self.heads[head][1].weight.dtype)).squeeze(-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Exit logits of every head: ``(B, L-1, w) -> (B, L-1)`` (``w``: :attr:`ExitHeadsConfig.feature_size`)."""
        return torch.stack(
            [self.layer_logits(j, features[:, j], features[:, j - 1] if j else None) for j in range(self.num_heads)],
            dim=1,
        )

    def exit_thresholds(self, threshold: float | None = None) -> torch.Tensor:
        """``(L-1,)`` float32 P(exit) threshold of each head: ``threshold`` for every head when given, else the
        calibrated ``config.thresholds``, else ``config.threshold`` for every head."""
        if threshold is not None:
            return torch.full((self.num_heads,), float(threshold))
        if self.config.thresholds is not None:
            return torch.tensor(self.config.thresholds, dtype=torch.float32)
        return torch.full((self.num_heads,), float(self.config.threshold))

    def exit_logits(self, threshold: float | None = None) -> torch.Tensor:
        """``(L-1,)`` float32 logit threshold of each head, what it fires on (``logit >= this``; ``+inf``: never):
        ``threshold`` (a P(exit)) for every head when given, else the calibrated ``config.threshold_logits``, else
        the calibrated ``config.thresholds``, else ``config.threshold`` for every head."""
        if threshold is not None:
            return exit_logit(torch.full((self.num_heads,), float(threshold))).float()
        if self.config.threshold_logits is not None:
            return torch.tensor([math.inf if t is None else t for t in self.config.threshold_logits]).float()
        if self.config.thresholds is not None:
            return exit_logit(torch.tensor(self.config.thresholds, dtype=torch.float64)).float()
        return exit_logit(torch.full((self.num_heads,), float(self.config.threshold), dtype=torch.float64)).float()

    def flops_per_row(self) -> int:
        """FLOPs of evaluating one head on one row (2 per multiply-add; norms ignored)."""
        d2, h = self.config.input_size, self.config.head_size
        return 2 * (d2 * h + h)

    # ----------------------------------------------------------------------------------------------- checking
    def check_model(self, model: nn.Module, processor: object = None, *, allow_other_model: bool = False) -> None:
        """Raise ``ValueError`` unless ``model`` is the model these heads were made for (and the engine can compute
        their inputs).

        The type, width and depth must match (heads of another shape cannot run). Then the saved model fingerprint
        must match ``model``'s (and, with ``processor``, its tokenizer's): heads of the same shape trained on other
        weights run, but their calibrated promise does not hold there.

        Args:
            model: the model the heads are about to be attached to.
            processor: its processor (compares the tokenizer and chat template too).
            allow_other_model: accept a fingerprint mismatch with a warning instead of an error.

        Raises:
            ValueError: extra inputs the engine does not compute, or another type / width / depth.
            dyvte.engine.fingerprint.ModelMismatchError: the fingerprint differs (the message names each field).
        """
        if self.config.extra_inputs:
            raise ValueError(
                f"these exit heads read extra inputs {self.config.extra_inputs} (an ablation variant, docs/report.md) "
                "that withdrawal does not compute; score them offline with dyvte.exits.rules"
            )
        spec = resolve(model)
        got = (spec.model_type, spec.text_config.hidden_size, spec.num_layers)
        want = (self.config.model_type, self.config.hidden_size, self.config.num_layers)
        if got != want:
            raise ValueError(
                "these exit heads were made for model_type={}, hidden_size={}, {} layers; the model is "
                "model_type={}, hidden_size={}, {} layers".format(*want, *got)
            )
        check_fingerprint(
            self.config.model_fingerprint,
            model,
            processor,
            what=f"exit heads {self.name_or_path}" if self.name_or_path else "these exit heads",
            allow_other_model=allow_other_model,
            logged=self.logged,
        )

    # ------------------------------------------------------------------------------------------------- saving
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``exit_heads.safetensors`` (the heads' weights only) and ``exit_heads_config.json``, atomically.

        Both files are written to temporary files beside their targets and renamed over them only once both are
        complete, so a save that fails midway leaves the heads that stood in ``directory`` loadable and unchanged.

        Raises:
            NotADirectoryError: ``directory`` is an existing file.
        """
        path = Path(directory)
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"{path} is an existing file: exit heads are saved into a directory")
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        config = json.dumps(asdict(self.config), indent=2) + "\n"
        with atomic_path(path / WEIGHTS_NAME) as weights, atomic_path(path / CONFIG_NAME) as config_file:
            save_file(state, str(weights), metadata={"format": "pt", "dyvte": "exit_heads"})
            config_file.write_text(config)
        return path

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ExitHeads:
        """Load heads written by :meth:`save_pretrained`.

        Raises:
            FileNotFoundError: the directory lacks the config or the weights.
            ValueError: the files are corrupt, of another format version, or do not match each other.
        """
        path = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path} has no {name}: not a dyvte exit-heads directory")
        try:
            raw = json.loads((path / CONFIG_NAME).read_text())
            config = ExitHeadsConfig(**raw)
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{path / CONFIG_NAME} is not a valid exit-heads config: {err}") from err
        if config.format_version != FORMAT_VERSION:
            raise ValueError(f"exit heads of format version {config.format_version}; this dyvte reads {FORMAT_VERSION}")
        heads = cls(config)
        try:
            state = load_file(str(path / WEIGHTS_NAME))
        except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
            raise ValueError(f"{path / WEIGHTS_NAME} is corrupt: {err}") from err
        expected = heads.state_dict()
        if set(state) != set(expected):
            raise ValueError(
                f"{path / WEIGHTS_NAME} does not hold these heads' weights: missing "
                f"{sorted(set(expected) - set(state))[:3]}, unexpected {sorted(set(state) - set(expected))[:3]}"
            )
        for key, value in state.items():
            if value.shape != expected[key].shape:
                raise ValueError(
                    f"{key}: shape {tuple(value.shape)} in the file, {tuple(expected[key].shape)} expected"
                )
        heads.load_state_dict(state)
        heads.name_or_path = str(directory)
        return heads.eval()
