"""The options of :class:`dyvte.train.label_data.ExitLabelData`, grouped by concern, each group checking itself.

* :class:`DataSource`: which model labels which records (``--data.source.*`` on ``train/fit.py``);
* :class:`SplitSizes`: how many records train, validate and calibrate, and how a held-out split is drawn
  (``--data.splits.*``);
* :class:`LabelOptions`: what the heads learn and how the label caches are built (``--data.labels.*``).

Each group is a frozen dataclass whose ``__post_init__`` refuses a bad value with a message naming its command-line
option, so a mistake is reported when the group is built, before any model is loaded or record labelled.
LightningCLI (jsonargparse) turns each group into nested options and YAML keys (``data: {source: {model: ...}}``);
the ``Attributes`` below are their help texts.
"""

from __future__ import annotations

from dataclasses import dataclass

from dyvte.data.formats import parse_columns
from dyvte.data.prompts import check_prompt_template
from dyvte.exits.rules import check_rule
from dyvte.utils.checks import check_positive_int

__all__ = ["DataSource", "LabelOptions", "SplitSizes"]


@dataclass(frozen=True)
class DataSource:
    """The model that labels and the records it labels (``--data.source.*``).

    Attributes:
        model: ``"demo"`` or a local model directory.
        data: ``"demo"``, a ``save_to_disk`` directory or a ``.json``/``.jsonl``/``.parquet`` records file.
        train_split: split used for training.
        val_split: split used for validation (and calibration).
        val_data: records for validation when they are not a split of ``data`` (default: ``data``).
        image_folder: the folder relative image paths of ``data`` and ``val_data`` are resolved against (default:
            each records file's own folder).
        columns: which source column holds each field (``"image=img,question=q,answer=a"`` or a mapping).
        skip_bad_rows: skip bad records, counted by reason in the log, instead of failing on the first.
        prompt_template: a format string with ``{question}`` for models without a chat template (or to override
            it), e.g. ``"USER: <image>\\n{question} ASSISTANT:"`` (:mod:`dyvte.data.prompts`).

    Raises:
        ValueError: a malformed ``columns`` mapping or ``prompt_template``.
    """

    model: str = "demo"
    data: str = "demo"
    train_split: str = "train"
    val_split: str = "validation"
    val_data: str | None = None
    image_folder: str | None = None
    columns: str | dict[str, str] | None = None
    skip_bad_rows: bool = False
    prompt_template: str | None = None

    def __post_init__(self) -> None:
        if self.prompt_template is not None:
            check_prompt_template(self.prompt_template)
        parse_columns(self.columns)

    def record_options(self) -> dict[str, str | dict[str, str] | bool | None]:
        """The options of :func:`dyvte.data.sources.load_records`: ``image_folder``, ``columns``, ``skip_bad_rows``."""
        return {"image_folder": self.image_folder, "columns": self.columns, "skip_bad_rows": self.skip_bad_rows}


@dataclass(frozen=True)
class SplitSizes:
    """How many records each split takes, and how validation is held out of the training records
    (``--data.splits.*``). Every size defaults to ``None``: sized from the records given (:meth:`platt_size` and
    the rules below); the demo's config (``configs/fit_demo.yaml``) pins its own measured sizes.

    Attributes:
        train_samples: records of the training split to label (``None``: all of them; the log gives the labelling
            time measured on the first batch before it goes on).
        val_samples: records to label for validation; they are also the reference the calibration Platt-scales
            each head on (:func:`dyvte.exits.rules.certify_thresholds`). ``None``: :meth:`platt_size` of the
            validation records (10% of them, at least 100 and at most 2,000, never more than half). When validation
            would come from the training records themselves (no ``val_data`` and ``data`` a single file or a
            split-less directory, or ``val_split == train_split``), this many records are held out of them at
            random (seeded by ``split_seed``; ``None``: ``val_fraction`` of them) and training takes the first
            ``train_samples`` of the rest.
        calib_samples: records for threshold calibration (:func:`dyvte.exits.rules.certify_thresholds`), disjoint from
            training and validation: the validation split's records right after the first ``val_samples`` (``None``:
            all of them), or, when validation is held out of the training records, that many more records held out
            with it (``None``: ``calib_fraction`` of them). 0: no calibration (the heads keep their single
            ``threshold`` and carry no promise). fit refuses, before labelling, a calibration split too
            small to certify its ``--tolerance`` at ``--delta``
            (:func:`dyvte.exits.risk.calibration_records_needed`).
        calib_fraction: share of the records held out for calibration in the held-out case when ``calib_samples``
            is ``None``.
        val_fraction: share of the records held out for validation in that case when ``val_samples`` is ``None``.
        split_seed: seed of the held-out validation sample (and of the on-the-fly exit-layer draws).

    Raises:
        ValueError: a size < 1 (``calib_samples`` < 0) or a fraction outside (0, 1).
    """

    train_samples: int | None = None
    val_samples: int | None = None
    calib_samples: int | None = None
    calib_fraction: float = 0.2
    val_fraction: float = 0.1
    split_seed: int = 0

    def __post_init__(self) -> None:
        calib = self.calib_samples
        if calib is not None and (isinstance(calib, bool) or not isinstance(calib, int) or calib < 0):
            raise ValueError(f"calib_samples (--data.splits.calib_samples) must be null or an int >= 0, got {calib!r}")
        if not 0.0 < self.calib_fraction < 1.0:
            raise ValueError(
                f"calib_fraction (--data.splits.calib_fraction) must be in (0, 1), got {self.calib_fraction!r}"
            )
        check_positive_int("train_samples (--data.splits.train_samples)", self.train_samples, optional=True)
        check_positive_int("val_samples (--data.splits.val_samples)", self.val_samples, optional=True)
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction (--data.splits.val_fraction) must be in (0, 1), got {self.val_fraction!r}")

    @staticmethod
    def platt_size(records: int) -> int:
        """The validation (Platt reference) records taken from a validation split of ``records`` records when
        ``val_samples`` is ``None``: 10% of them, at least 100 and at most 2,000, and never more than half (the rest
        calibrates)."""
        return max(1, min(max(100, round(0.1 * records)), 2000, records // 2))


@dataclass(frozen=True)
class LabelOptions:
    """What each exit head learns, and how the label caches are built (``--data.labels.*``).

    Attributes:
        rule: what head j learns (:mod:`dyvte.exits.rules`): ``"agreement"`` (default: withdrawal at j + 1 and at
            every later exit layer gives the full model's answer), ``"kl"`` (answer KL <= ``kl_eta`` there),
            ``"dyvte"`` (the paper's rule, made monotone the same way), ``"dyvte-layer"`` (the paper's rule at
            j + 1 only) or ``"agreement-layer"`` (the full model's answer at j + 1 only).
        kl_eta: the ``kl`` rule's bound, in nats.
        agree: DyVTE agreement threshold (the ``dyvte`` rules).
        loss_ratio: DyVTE loss-ratio threshold (the ``dyvte`` rules).
        batch_size: rows per MLLM forward while labelling.
        cache_dir: where label caches live (default ``<repo>/runs/label-cache``, see
            :func:`dyvte.train.runs.default_label_cache_dir`); one folder per model weights, data, split, samples,
            agree and loss_ratio.
        relabel: label again even where a cache for the same key exists (it is replaced); without it an existing
            cache is reused, and the log says so with its path.
        shard_size: records per label-cache shard. Every rank (``--trainer.devices``) labels its own shards, written
            as they complete; a killed run keeps its finished shards and labels only the rest
            (:mod:`dyvte.exits.shards`).
        on_the_fly: train with fresh labels at every step, the paper's way (:mod:`dyvte.exits.onthefly`): each training
            sample draws one exit layer, full and withdrawn copies run in one forward, and only that layer's head
            learns from it (``rule`` must be ``dyvte-layer``; no training label cache, no class balancing).
            Validation and calibration still use label caches.
        visual_inputs: heads that also read the visual tokens' states at their layer, pooled (mean and elementwise
            max; :attr:`dyvte.policies.exit_heads.ExitHeadsConfig.visual_inputs`). The label caches keep those inputs
            too (twice the features' size; a key of their own).

    Raises:
        ValueError: an unknown rule, a value out of range, ``on_the_fly`` with a rule other than ``dyvte-layer``, or
            with ``visual_inputs``.
    """

    rule: str = "agreement"
    kl_eta: float = 0.05
    agree: float = 0.99
    loss_ratio: float = 1.03
    batch_size: int = 64
    cache_dir: str | None = None
    relabel: bool = False
    shard_size: int = 1024
    on_the_fly: bool = False
    visual_inputs: bool = False

    def __post_init__(self) -> None:
        try:
            check_rule(self.rule)
        except ValueError as err:
            raise ValueError(f"--data.labels.rule: {err}") from None
        if not self.kl_eta > 0:
            raise ValueError(f"kl_eta (--data.labels.kl_eta) must be > 0, got {self.kl_eta!r}")
        check_positive_int("batch_size (--data.labels.batch_size)", self.batch_size)
        check_positive_int("shard_size (--data.labels.shard_size)", self.shard_size)
        if self.on_the_fly and self.rule != "dyvte-layer":
            raise ValueError(
                f"--data.labels.on_the_fly labels one exit layer per sample with the paper's rule at that layer only; "
                f"pass --data.labels.rule dyvte-layer (got {self.rule!r})"
            )
        if self.on_the_fly and self.visual_inputs:
            raise ValueError(
                "--data.labels.on_the_fly labels only the plain head inputs; heads with --data.labels.visual_inputs "
                "learn from label caches (drop one of the two)"
            )
        if not 0.0 <= self.agree < 1.0:
            raise ValueError(
                f"agree (--data.labels.agree) must be in [0, 1) (agreement must exceed it), got {self.agree!r}"
            )
        if not self.loss_ratio >= 1.0:
            raise ValueError(
                f"loss_ratio (--data.labels.loss_ratio) must be >= 1 (below 1 even a prediction identical to the full "
                f"model's is labelled unsafe), got {self.loss_ratio!r}"
            )
