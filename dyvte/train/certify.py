"""Before and after training exit heads: the checks a fit run makes before it labels anything (the promise its
calibration split can certify, split overlaps, calibration groups) and the certification of the trained heads'
thresholds on the calibration split (Learn-then-Test), with the promise in words. Used by ``dyvte fit``
(:mod:`dyvte.cli.fit`); they log under the ``fit`` logger, as the job's own lines.
"""

from __future__ import annotations

import logging

import numpy as np

from dyvte.data.fingerprints import check_overlaps, short_digests
from dyvte.data.sources import load_config
from dyvte.eval.flops import relative_flops_per_exit
from dyvte.exits.risk import calibration_records_needed, promise_text, small_groups
from dyvte.exits.rules import certify_thresholds, exit_savings
from dyvte.policies.shift import reference_from_features
from dyvte.train.label_data import ExitLabelData

log = logging.getLogger("fit")

__all__ = ["calibration_groups", "certify", "check_groups", "check_promise", "check_split_overlap"]


def check_promise(data: ExitLabelData, tolerance: float, delta: float) -> dict[str, int]:
    """Log the records each split takes and refuse, before any model is loaded or record labelled, a calibration split
    too small to certify ``tolerance`` at ``delta`` (:func:`dyvte.exits.risk.calibration_records_needed`); warn when
    it leaves the heads little room to exit.

    Returns:
        The record counts ``{"train", "val", "calib"}``.

    Raises:
        ValueError: fewer calibration records than the promise needs, with the number it needs and the options that
            change either.
    """
    counts = data.plan.counts()
    log.info(
        "records: %s training, %s validation (the Platt reference), %s calibration (the promise)",
        f"{counts['train']:,}",
        f"{counts['val']:,}",
        f"{counts['calib']:,}",
    )
    if data.plan.sizes.calib_samples == 0:
        log.warning(
            "no calibration (--data.splits.calib_samples 0): the heads keep --model.threshold and carry no promise"
        )
        return counts
    needed = calibration_records_needed(tolerance, delta)
    room = calibration_records_needed(tolerance, delta, tolerance / 2)
    calib = counts["calib"]
    if calib < needed:
        raise ValueError(
            f"a promise of at most {100 * tolerance:g}% disagreement (--tolerance {tolerance:g}) at --delta {delta:g} "
            f"needs at least {needed:,} calibration records (and about {room:,} to leave the heads room to exit: with "
            f"{needed:,}, a single disagreement fails it); this run has {calib:,} "
            f"({data.split_summary().get('calib', 'held out of the training records')}). Give more validation "
            "records (--data.source.val_data, --data.splits.calib_samples), lower --data.splits.val_samples, raise "
            "--tolerance, or pass --data.splits.calib_samples 0 to train heads without a promise. Nothing was labelled."
        )
    if calib < room:
        log.warning(
            "calibration: %s records certify a %g%% promise only if the heads realize about half of it or less there "
            "(%s records would leave room to exit at half the promise); expect few early exits",
            f"{calib:,}",
            100 * tolerance,
            f"{room:,}",
        )
    return counts


def check_split_overlap(data: ExitLabelData, allow: bool) -> None:
    """Refuse, before labelling, validation or calibration records that are mostly copies of training records (or
    calibration records of validation records), compared by record digest (:meth:`SplitPlan.overlaps`
    <dyvte.train.splits.SplitPlan.overlaps>): a warning with the counts for any copy, an error above
    :data:`dyvte.data.fingerprints.MAX_OVERLAP` unless ``allow`` (``--allow_overlap true``).

    Raises:
        ValueError: naming the counts, their shares and ``--allow_overlap``.
    """
    overlaps = data.plan.overlaps()
    check_overlaps(
        overlaps,
        allow,
        "validation on copies of training records overstates the heads, and a promise certified on copies of the "
        "records the heads (or their Platt scaling) saw does not hold for new records",
        done="Nothing was labelled.",
        log=log,
    )
    if not any(overlap.count for overlap in overlaps):
        log.info(
            "held-out records: none of the validation or calibration records is a copy of a training record, nor a "
            "calibration record of a validation record (%s records compared by question, answer, earlier turns and "
            "image bytes)",
            f"{sum(data.plan.counts().values()):,}",
        )


def calibration_groups(data: ExitLabelData, group_by: str) -> list[str] | None:
    """Each calibration record's group under ``--group_by`` (``None`` for ``none``), read from the records
    themselves, before any labelling (a record without a ``qtype`` is in group ``all``, as in the label cache)."""
    if group_by == "none":
        return None
    records = data.plan.records(data.plan.parts()["calib"])
    if group_by not in records.column_names:
        return ["all"] * len(records)
    return [str(q) for q in records[group_by]]


def check_groups(data: ExitLabelData, group_by: str, tolerance: float, delta: float, margin: float) -> None:
    """Refuse, before labelling, a calibration split on which the promise cannot be certified at ``tolerance x
    (1 - margin)``: with ``--group_by qtype`` every type needs ``calibration_records_needed(ε (1 - m), δ / G)``
    records of its own (small groups are refused, not merged: a merged group would promise nothing about either of
    its types); pooled, the whole split does.

    Raises:
        ValueError: naming each group that is too small, its records and what it needs, and the options that help.
    """
    if data.plan.sizes.calib_samples == 0:
        return
    groups = calibration_groups(data, group_by)
    if groups is None:
        sizes = {"all": data.plan.counts()["calib"]}
    else:
        names, counts = np.unique(np.asarray(groups, dtype=str), return_counts=True)
        sizes = {str(name): int(n) for name, n in zip(names, counts, strict=True)}
        log.info(
            "calibration groups by %s: %s (each certified at delta / %d = %.3g)",
            group_by,
            ", ".join(f"{name} {n:,}" for name, n in sizes.items()),
            len(sizes),
            delta / len(sizes),
        )
    small = small_groups(sizes, tolerance, delta, margin)
    if small:
        listed = ", ".join(f"{name}: {sizes[name]:,} of {need:,}" for name, need in small.items())
        what = f"each {group_by} group" if groups is not None else "the calibration split"
        raise ValueError(
            f"certifying at most {100 * tolerance:g}% disagreement with --margin {margin:g} (certified at "
            f"{100 * tolerance * (1 - margin):.3g}%) at --delta {delta:g}{f' / {len(sizes)} groups' if groups else ''} "
            f"needs more calibration records in {what} ({listed}). Give more calibration records "
            "(--data.splits.calib_samples, --data.source.val_data), lower --margin, raise --tolerance, or use "
            "--group_by none. Nothing was labelled."
        )


def certify(
    heads, data: ExitLabelData, tolerance: float, delta: float, margin: float = 0.0, group_by: str = "none"
) -> dict | None:
    """Choose the heads' thresholds on the calibration split (Learn-then-Test: pooled, or per ``group_by`` group at
    ``delta / G``; certified at ``tolerance x (1 - margin)``) and store them in their config, with the promise in
    words: what it covers (exchangeability, δ, calibration size, groups, margin)."""
    if "calib" not in data.columns:
        log.info(
            "no calibration split (--data.splits.calib_samples 0): the heads keep threshold %g", heads.config.threshold
        )
        return None
    val = data.columns["val"]
    flops = relative_flops_per_exit(load_config(data.source.model), val["tokens"], val["visual"])  # (N, L+1)
    savings = exit_savings(flops.numpy())  # (L-1,) what an exit at K = j + 1 saves, on validation
    calib = data.columns["calib"]
    groups = None if group_by == "none" else calib[group_by]
    chosen = certify_thresholds(
        heads,
        data.tensors["calib"][0],
        calib["match"],
        tolerance,
        delta,
        data.tensors["val"],
        savings=savings,
        groups=groups,
        margin=margin,
    )
    result = chosen.result
    record = {**chosen.record(), "label_rule": data.labels.rule, "source": data.split_summary()}
    record["group_by"] = group_by
    # which records certified the thresholds, so that evaluate can refuse to test them on those very records
    record["record_digests"] = short_digests(data.plan.digests("calib"))
    record["promise"] = promise_text(tolerance, delta, result.samples, margin, chosen.group_sizes, group_by)
    record["covers"] = {
        "exchangeability": "new records drawn like the calibration records"
        + (f" (within each {group_by} group)" if chosen.group_sizes else ""),
        "delta": delta,
        "calibration_records": result.samples,
        "groups": chosen.group_sizes,
        "margin": margin,
        "certified_at": result.certified_at,
    }
    room = calibration_records_needed(tolerance, delta, tolerance / 2)
    if result.samples < room:
        record["warning"] = (
            f"only {result.samples:,} calibration records: the promise holds as stated, but it is loose (about "
            f"{room:,} are needed to certify heads that realize half of it)"
        )
    record["savings"] = [round(float(x), 6) for x in savings]
    heads.config.thresholds, heads.config.threshold_logits = chosen.thresholds, chosen.logits
    heads.config.calibration = record
    # the calibration distribution of each head's scores, what withdraw(heads=...).shift_report() tests against
    heads.config.score_reference = reference_from_features(heads, data.tensors["calib"][0])
    if result.parameter is None:
        log.warning(
            "calibration: no threshold keeps at most %.3g disagreement (certified at %.3g, margin %g%s) with "
            "probability >= %.3g on %d samples; the saved heads never fire (raise --tolerance or "
            "--data.splits.calib_samples, lower --margin)",
            tolerance,
            result.certified_at,
            margin,
            f", every {group_by} group" if chosen.group_sizes else "",
            1 - delta,
            result.samples,
        )
    else:
        per_group = ""
        if result.groups:
            per_group = " per group: " + ", ".join(
                f"{name} {g['errors']}/{g['samples']:,}" for name, g in sorted(result.groups.items())
            )
        log.info(
            "calibration: per-head thresholds %s (head j fires when its Platt-scaled P(unsafe) <= %.6g x the "
            "share of the largest saving it brings; scaled on validation) keep the disagreement with the full "
            "model <= %.3g with probability >= %.3g (Learn-then-Test at %.3g = tolerance x (1 - margin %g) on %d "
            "held-out samples: %d disagreements%s, %.1f%% exit early). The promise: %s",
            [round(t, 4) for t in chosen.thresholds],
            result.parameter,
            tolerance,
            1 - delta,
            result.certified_at,
            margin,
            result.samples,
            result.errors,
            per_group,
            100 * result.exit_rate,
            record["promise"],
        )
        if "warning" in record:
            log.warning("calibration: %s", record["warning"])
    return record
