"""Withdrawal-aware LoRA adaptation: train the text decoder to need its visual tokens for fewer layers.

VTW withdraws the visual tokens of a frozen model after layer K-1. Here LoRA adapters (``peft``) on the text
decoder's attention and MLP projections are trained *while* the visual tokens are withdrawn, so that the answer
information moves into the text tokens before the exit. Each training row gets an exit layer drawn from a set of
candidates (one adapter then serves several K; including ``K = L`` keeps the adapter honest on full-length runs).

Loss per batch::

    CE(answer tokens | withdrawn at K, adapters on)                   # dyvte's loss on the kept positions
    + distill * mean_answer_positions KL(P_base_full || P_adapted_withdrawn)

where ``P_base_full`` is the frozen base (adapters disabled, nothing withdrawn). The vision tower, the projector and
every base weight stay frozen; only the adapter is saved (``PeftModel.save_pretrained``), and Lightning checkpoints
hold only the adapter's tensors too.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.utils.data import DataLoader

from dyvte.data.adapters import check_adapter
from dyvte.data.records import build_inputs
from dyvte.engine.compat import logits_of
from dyvte.engine.registry import LORA_TARGETS, resolve
from dyvte.eval.harness import EvalResult
from dyvte.exits.kl import kl_divergence, scored_positions
from dyvte.policies.withdraw import withdraw

__all__ = [
    "DECODER_PROJECTIONS",
    "AdaptData",
    "AdaptModule",
    "add_lora",
    "adapt_loss",
    "compare_sweeps",
    "decoder_target_regex",
    "draw_exit_layers",
    "load_adapter",
]

logger = logging.getLogger(__name__)

DECODER_PROJECTIONS = LORA_TARGETS
"""The Llama-style text-decoder projections LoRA targets by default (attention + gated MLP; the registry's
``Family.lora_targets`` default, kept here under its old name)."""


def decoder_target_regex(model: nn.Module, targets: Sequence[str] | None = None) -> str:
    """A peft ``target_modules`` regex that matches ``targets`` inside the text decoder's layers only.

    The decoder's path comes from dyvte's registry, so the vision tower (whose CLIP/SigLIP layers also have
    ``q_proj`` / ``k_proj`` / ``v_proj``) and the projector are never adapted.

    Args:
        model: a supported ``...ForConditionalGeneration`` model.
        targets: leaf module names inside each decoder layer (default: the family's ``lora_targets`` in the
            registry).

    Returns:
        A regex that peft ``re.fullmatch``-es against module names, e.g.
        ``model\\.language_model\\.layers\\.\\d+\\.(?:.*\\.)?(?:q_proj|...)``.
    """
    family = resolve(model).family
    path = family.decoder_path
    names = "|".join(re.escape(t) for t in (family.lora_targets if targets is None else targets))
    return rf"{re.escape(path)}\.layers\.\d+\.(?:.*\.)?(?:{names})"


def add_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: Sequence[str] | None = None,
    base_name: str | None = None,
) -> PeftModel:
    """Wrap ``model`` in a ``PeftModel`` with LoRA on the text decoder's ``targets``; every base weight is frozen.

    Args:
        model: a supported ``...ForConditionalGeneration`` model.
        rank: LoRA rank r.
        alpha: LoRA alpha (the update is scaled by alpha / r).
        dropout: LoRA dropout on the adapter's input.
        targets: leaf module names inside each decoder layer (default: the family's ``lora_targets``, i.e.
            :data:`DECODER_PROJECTIONS`).
        base_name: what ``adapter_config.json`` records as the base model (``"demo"`` or a directory); default:
            the model's ``name_or_path``.

    Returns:
        The ``PeftModel`` (no task type: ``forward`` passes every keyword through to the model).
    """
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=decoder_target_regex(model, targets),
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    if base_name is not None:
        peft_model.peft_config["default"].base_model_name_or_path = base_name
    return peft_model


def load_adapter(model: nn.Module, directory: str | Path, **options: Any) -> PeftModel:
    """``PeftModel.from_pretrained(model, directory, **options)`` in eval mode, once the adapter's shapes are checked
    against ``model`` (:func:`dyvte.data.adapters.check_adapter`).

    Raises:
        dyvte.data.adapters.AdapterMismatchError: the adapter was trained on a base of other widths (one message
            naming the adapter, its base and a module with both shapes, instead of torch's ``size mismatch`` list).
    """
    check_adapter(model, directory)
    return PeftModel.from_pretrained(model, str(directory), **options).eval()


def draw_exit_layers(
    candidates: Sequence[int], batch: int, per_row: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``(B,)`` long exit layers drawn uniformly from ``candidates``: one per row, or one for the whole batch."""
    choices = torch.as_tensor(list(candidates), dtype=torch.long)
    picks = torch.randint(len(choices), (batch if per_row else 1,), generator=generator)
    return choices[picks].expand(batch).clone()


def adapt_loss(
    model: PeftModel, batch: dict[str, torch.Tensor], exit_layers: torch.Tensor, distill: float = 0.0
) -> dict[str, torch.Tensor]:
    """The adaptation loss of one teacher-forced batch under per-row withdrawal.

    Args:
        model: the ``PeftModel`` being trained.
        batch: :func:`dyvte.data.records.build_inputs` output with ``labels`` (-100 except on answer tokens).
        exit_layers: ``(B,)`` exit layer K of each row (``L`` = not withdrawn).
        distill: weight of ``KL(P_base_full || P_adapted_withdrawn)`` at the answer positions (0: off).

    Returns:
        ``{"loss", "ce"}`` and, when ``distill > 0``, ``"kl"``; ``"loss" = ce + distill * kl``.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]  # (B, T)
    teacher = None
    if distill > 0:
        with torch.no_grad(), model.disable_adapter():
            teacher = logits_of(model(**inputs))  # (B, T, V) base model, nothing withdrawn
    with withdraw(model, layer=exit_layers) as handle:
        out = model(**inputs, labels=labels)  # loss on the kept positions
        logits = handle.to_input_positions(logits_of(out))  # (B, T, V), withdrawn positions zero
    result = {"ce": out.loss}
    loss = out.loss
    if teacher is not None:
        answer = scored_positions(batch, "answer")  # (B, T) positions that predict an answer token
        kl = kl_divergence(teacher[answer], logits[answer]).mean()  # KL(full base || adapted withdrawn)
        result["kl"] = kl
        loss = loss + distill * kl
    result["loss"] = loss
    return result


class AdaptData(L.LightningDataModule):
    """Batches of (image, question, answer) records; the module turns them into teacher-forced inputs.

    Args:
        data: ``"demo"``, a ``save_to_disk`` directory or a ``.json``/``.jsonl``/``.parquet`` records file.
        train_split: split used for training.
        val_split: split used for validation.
        train_samples: records of ``train_split`` to use (``None``: all).
        val_samples: records of ``val_split`` to use. With a single records file (no named splits) they are held
            out of it at random (seed ``seed``; default a tenth), disjoint from the training records.
        batch_size: rows per step.
        seed: shuffling seed.
    """

    def __init__(
        self,
        data: str = "demo",
        train_split: str = "train",
        val_split: str = "validation",
        train_samples: int | None = None,
        val_samples: int | None = 200,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.splits: dict[str, Any] = {}

    def setup(self, stage: str | None = None) -> None:
        """Load the two splits (lazily decoded ``datasets`` rows)."""
        if self.splits:
            return
        from dyvte.data.sources import load_records
        from dyvte.train.splits import has_named_splits, held_out_split

        hp = self.hparams
        if hp.train_split != hp.val_split and has_named_splits(hp.data):
            self.splits["train"] = load_records(hp.data, hp.train_split, hp.train_samples)
            self.splits["val"] = load_records(hp.data, hp.val_split, hp.val_samples)
            return
        # one set of records (a single file): validate on a seeded held-out part, never on training records
        records = load_records(hp.data, hp.train_split, None)
        train, val = held_out_split(len(records), hp.val_samples, hp.train_samples, hp.seed)
        self.splits["train"], self.splits["val"] = records.select(train), records.select(val)
        logger.info(
            "validation: %d records held out at random (seed %d) from the %d records of %s, disjoint from the %d "
            "training records",
            len(val),
            hp.seed,
            len(records),
            hp.data,
            len(train),
        )

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(
            self.splits["train"], batch_size=self.hparams.batch_size, shuffle=True, collate_fn=list, generator=generator
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=self.hparams.batch_size, collate_fn=list)


class AdaptModule(L.LightningModule):
    """LoRA on the text decoder, trained under withdrawal at exit layers drawn from ``exit_layers``.

    Args:
        model: ``"demo"`` or a local ``from_pretrained`` directory (the frozen base).
        rank: LoRA rank.
        alpha: LoRA alpha.
        dropout: LoRA dropout.
        targets: leaf projection names inside each decoder layer.
        exit_layers: candidate exit layers K; each row draws one per step (``L`` = a full-length row).
        per_row: draw K per row (``True``) or one K per step.
        distill: weight of the KL(full base || adapted withdrawn) term at the answer positions (0: CE only).
        lr: AdamW learning rate of the adapter.
        weight_decay: AdamW weight decay.
        warmup: linear warm-up steps, then constant.
        seed: seed of the exit-layer draws.
        prompt_template: prompt format string with ``{question}`` for a model without a chat template
            (:mod:`dyvte.data.prompts`; ``--model.prompt_template``).
    """

    def __init__(
        self,
        model: str = "demo",
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        targets: tuple[str, ...] = DECODER_PROJECTIONS,
        exit_layers: tuple[int, ...] = (4, 5, 6, 8),
        per_row: bool = True,
        distill: float = 0.0,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        warmup: int = 20,
        seed: int = 0,
        prompt_template: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from dyvte.data.sources import load_model

        base, self.processor = load_model(model, prompt_template=prompt_template)
        num_layers = resolve(base).num_layers
        bad = [k for k in exit_layers if not 0 <= k <= num_layers]
        if not exit_layers or bad:
            raise ValueError(f"exit_layers must be non-empty and in [0, {num_layers}], got {list(exit_layers)}")
        self.num_layers = num_layers
        self.model = add_lora(base, rank, alpha, dropout, targets, base_name=model)
        self.model.train()  # load_model returns eval mode; LoRA dropout needs train mode
        self.draws = torch.Generator().manual_seed(seed)
        self.strict_loading = False  # checkpoints hold the adapter only

    def _inputs(self, records: list[dict]) -> dict[str, torch.Tensor]:
        batch = build_inputs(self.processor, records, with_answers=True)
        return {k: v.to(self.device) for k, v in batch.items()}

    def training_step(self, records: list[dict], batch_idx: int) -> torch.Tensor:
        batch = self._inputs(records)
        layers = draw_exit_layers(self.hparams.exit_layers, len(records), self.hparams.per_row, self.draws)
        parts = adapt_loss(self.model, batch, layers, self.hparams.distill)
        for name, value in parts.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=len(records))
        return parts["loss"]

    def validation_step(self, records: list[dict], batch_idx: int) -> None:
        batch = self._inputs(records)
        for k in sorted(set(self.hparams.exit_layers)):
            layers = torch.full((len(records),), k, dtype=torch.long)
            parts = adapt_loss(self.model, batch, layers, self.hparams.distill)
            self.log(f"val/ce_K{k}", parts["ce"], batch_size=len(records))
            if "kl" in parts:
                self.log(f"val/kl_K{k}", parts["kl"], batch_size=len(records))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the trainable (adapter) tensors in Lightning checkpoints."""
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warmup = max(1, self.hparams.warmup)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _sweep(run_dir: Path) -> tuple[dict[int, dict[str, float]], EvalResult]:
    """Overall metrics per exit layer K (``L`` = the full model) and the full model's result of an evaluate run."""
    metrics = json.loads((run_dir / "results.json").read_text())
    full = EvalResult.load(run_dir / "full.json")
    layers = {int(name.split("=")[1]): m["all"] for name, m in metrics.items() if name.startswith("static K=")}
    layers.setdefault(round(full.metrics["all"]["exit_mean"]), full.metrics["all"])  # the full model exits at L
    return layers, full


def compare_sweeps(base_dir: str | Path, adapted_dir: str | Path, tolerance: float = 0.005) -> tuple[str, dict]:
    """Side-by-side accuracy vs exit layer K of two ``train/evaluate.py`` runs (``full`` + ``static:all``).

    Args:
        base_dir: output directory of the base model's run.
        adapted_dir: output directory of the adapted model's run (same data).
        tolerance: accuracy drop allowed below the *base* model's full accuracy.

    Returns:
        ``(markdown, summary)``: the table plus, for each model, the earliest K whose accuracy is within
        ``tolerance`` of the base's full accuracy (and its relative prefill FLOPs), and the earliest K from which
        every K' >= K is; and the agreement of the adapted model's answers with the base model's, withdrawal off
        (overall and per question type).
    """
    base, base_full = _sweep(Path(base_dir))
    adapted, adapted_full = _sweep(Path(adapted_dir))
    if len(base_full.answers) != len(adapted_full.answers):
        raise ValueError("the two runs evaluated different numbers of samples")
    target = base_full.accuracy - tolerance
    lines = [
        "| K | base accuracy | adapted accuracy | rel. prefill FLOPs |",
        "|---|---|---|---|",
    ]
    for k in sorted(base):
        lines.append(
            f"| {k} | {base[k]['accuracy']:.3f} | {adapted[k]['accuracy']:.3f} | {base[k]['relative_flops']:.3f} |"
        )

    def earliest(sweep: dict[int, dict[str, float]], every: bool) -> int:
        ok = [k for k in sorted(sweep) if sweep[k]["accuracy"] >= target]
        if every:  # every K' >= K must hold too
            ok = [k for k in ok if all(sweep[j]["accuracy"] >= target for j in sweep if j >= k)]
        return min(ok, default=max(sweep))

    summary: dict[str, Any] = {"target_accuracy": target, "base_full_accuracy": base_full.accuracy}
    for name, sweep in (("base", base), ("adapted", adapted)):
        k = earliest(sweep, every=False)
        summary[name] = {
            "earliest_K": k,
            "accuracy": sweep[k]["accuracy"],
            "relative_flops": sweep[k]["relative_flops"],
            "earliest_K_every_later_K_too": earliest(sweep, every=True),
        }
    same = [a == b for a, b in zip(base_full.answers, adapted_full.answers, strict=True)]
    per_type: dict[str, list[bool]] = {}
    for qtype, agree in zip(base_full.qtypes, same, strict=True):
        per_type.setdefault(qtype, []).append(agree)
    summary["agreement_with_base_withdrawal_off"] = {
        "all": sum(same) / len(same),
        **{q: sum(v) / len(v) for q, v in sorted(per_type.items())},
    }
    lines.append("")
    lines.append(f"earliest K with accuracy >= base full - {tolerance:g} ({target:.3f}):")
    for name in ("base", "adapted"):
        s = summary[name]
        lines.append(
            f"  {name}: K = {s['earliest_K']} (accuracy {s['accuracy']:.3f}, "
            f"rel. prefill FLOPs {s['relative_flops']:.3f}); with every K' >= K too: "
            f"K = {s['earliest_K_every_later_K_too']}"
        )
    agreement = summary["agreement_with_base_withdrawal_off"]
    lines.append("adapted vs base answers, withdrawal off: " + ", ".join(f"{q} {v:.3f}" for q, v in agreement.items()))
    return "\n".join(lines), summary
