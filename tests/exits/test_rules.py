"""Label rules, offline exit scoring and calibrated thresholds (dyvte.exits.rules).

Invariants: head targets and first exits on hand-built columns; Platt thresholds fire exactly where the scaled rule
does, and the savings family where its risk is proportional to its saving; the savings calibration keeps its promise
over many calibration draws; scoring exits from a label cache equals running the engine (same exit layers, same
answers); calibrated thresholds are what ``withdraw(heads=...)`` uses by default. The binomial tail and
Learn-then-Test itself are ``tests/exits/test_risk.py``'s.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dyvte
from dyvte.data.records import build_inputs
from dyvte.exits.labels import label_batch
from dyvte.exits.rules import (
    agrees_at,
    certify_thresholds,
    check_rule,
    exit_logit,
    exit_ok,
    exit_savings,
    first_exit,
    head_targets,
    outcome,
    platt_scaling,
    platt_thresholds,
    safe_from,
    savings_levels,
)
from dyvte.policies.exit_heads import NEVER, ExitHeads, ExitHeadsConfig


def test_rules_targets_and_first_exit():
    match = np.array([[True, False, True, True], [False, True, True, True], [True, True, True, False]])
    kl = np.array([[0.0, 0.2, 0.01, 0.0], [0.3, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5]], dtype=np.float32)
    paper = ~match
    columns = {"match": match, "kl": kl, "dyvte": paper}
    assert safe_from(match).tolist() == [
        [False, False, True, True],
        [False, True, True, True],
        [False, False, False, False],
    ]
    assert head_targets(columns, "agreement").tolist() == [[0, 1, 1], [1, 1, 1], [0, 0, 0]]
    assert head_targets(columns, "kl", eta=0.05).tolist() == [[0, 1, 1], [1, 1, 1], [0, 0, 0]]
    assert head_targets(columns, "kl", eta=0.25).tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 0]]
    assert head_targets(columns, "dyvte-layer").tolist() == paper[:, 1:].astype(float).tolist()
    # agreement-layer: match[K] alone, the risk of a first exit at K (row 0 agrees at K = 2 and 3, not at 1)
    assert head_targets(columns, "agreement-layer").tolist() == match[:, 1:].astype(float).tolist()
    assert check_rule("dyvte-layer") == "dyvte-layer" and check_rule("dyvte") == "dyvte"
    assert exit_ok(columns, "dyvte").tolist() == paper.tolist()
    with pytest.raises(
        ValueError, match="label_rule must be one of agreement, agreement-layer, kl, dyvte, dyvte-layer"
    ):
        check_rule("safe")
    logits = exit_logit(torch.tensor([[0.1, 0.9, 0.2], [0.95, 0.1, 0.1], [0.1, 0.1, 0.1]])).float()
    assert first_exit(logits, exit_logit(torch.tensor([0.9, 0.9, 0.9]))).tolist() == [2, 1, 4]
    assert first_exit(logits, exit_logit(torch.tensor([0.99, 0.95, 0.15]))).tolist() == [3, 4, 4]
    assert first_exit(logits, torch.tensor([math.inf, -math.inf, math.inf])).tolist() == [2, 2, 2]
    # heads fire on logits: a float32 sigmoid ties every logit above ~17 at 1.0, the logits keep their order
    confident = torch.tensor([[20.0, 0.0], [40.0, 0.0]])
    assert torch.sigmoid(confident[:, 0]).tolist() == [1.0, 1.0]
    assert first_exit(confident, torch.tensor([30.0, math.inf])).tolist() == [3, 1]
    assert exit_logit(torch.tensor([0.0, 0.5, 1.0, NEVER])).tolist() == [-math.inf, 0.0, math.inf, math.inf]
    columns["correct"] = np.ones((3, 5), dtype=bool)
    assert outcome(columns, torch.tensor([2, 1, 4]))["agree"].tolist() == [True, True, True]
    assert outcome(columns, torch.tensor([1, 0, 3]))["agree"].tolist() == [False, False, False]


def test_platt_thresholds_equal_the_scaled_rule():
    """Raw thresholds from Platt scaling fire exactly where sigmoid(a * logit + b) >= level."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(400, 3, generator=gen) * 3
    truth = torch.sigmoid(torch.stack([2 * logits[:, 0] - 1, 0.5 * logits[:, 1] + 2, -logits[:, 2]], 1))
    targets = (torch.rand(400, 3, generator=gen) < truth).float()
    a, b = platt_scaling(logits, targets)
    assert a[0] == pytest.approx(2.0, abs=0.5) and a[1] == pytest.approx(0.5, abs=0.3) and a[2] < 0
    for level in (0.3, 0.8, 0.95):
        raw = platt_thresholds(a, b, level)
        scaled = torch.sigmoid(a[None] * logits.double() + b[None]) >= level
        assert torch.equal((logits.double() >= raw[None])[:, :2], scaled[:, :2]), level
        assert raw[2] == math.inf  # a head ranking the wrong way never fires
    assert platt_thresholds(a, b, 1.0).tolist() == [math.inf] * 3


def test_savings_family_fires_where_the_risk_it_may_take_is_proportional_to_its_saving():
    """Per-head levels 1 - mu * s_j / max(s): head j fires exactly where its Platt P(unsafe) <= mu * s_j / max(s)."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(500, 3, generator=gen) * 2
    targets = (torch.rand(500, 3, generator=gen) < torch.sigmoid(1.5 * logits)).float()
    a, b = platt_scaling(logits, targets)
    savings = torch.tensor([0.6, 0.3, 0.15], dtype=torch.float64)
    assert savings_levels(savings, 0.0).tolist() == [1.0, 1.0, 1.0]  # mu = 0: nothing fires
    assert platt_thresholds(a, b, savings_levels(savings, 0.0)).tolist() == [math.inf] * 3
    for mu in (0.01, 0.1, 0.4):
        raw = platt_thresholds(a, b, savings_levels(savings, mu))
        unsafe = 1 - torch.sigmoid(a[None] * logits.double() + b[None])
        expected = unsafe <= mu * savings[None] / savings.max()
        assert torch.equal(logits.double() >= raw[None], expected), mu
    # one level for every head is the platt family
    assert torch.equal(platt_thresholds(a, b, torch.full((3,), 0.8, dtype=torch.float64)), platt_thresholds(a, b, 0.8))
    flops = np.array([[0.2, 0.4, 0.7, 0.9, 1.0], [0.4, 0.5, 0.7, 0.8, 1.0]])  # (N, L+1) at K = 0..L
    assert exit_savings(flops).tolist() == pytest.approx([0.55, 0.3, 0.15])


def test_savings_calibration_keeps_its_promise_over_many_calibration_draws():
    """Learn-then-Test over the savings family: the true disagreement rate of the chosen thresholds exceeds the
    tolerance in at most about delta of the calibration draws (synthetic heads whose truth is known)."""
    gen = torch.Generator().manual_seed(2)
    num_layers, tolerance, delta = 4, 0.05, 0.2
    savings = torch.tensor([0.6, 0.4, 0.2], dtype=torch.float64)

    def draw(n: int):
        skill = torch.randn(n, generator=gen)  # easy samples are safe early
        safe_from = torch.clamp((2.0 - skill + 0.7 * torch.randn(n, generator=gen)).round(), 1, num_layers).long()
        match = torch.arange(num_layers)[None] >= safe_from[:, None]  # (n, L): the answer holds from safe_from on
        logits = torch.stack([skill + (j - 1) + 0.5 * torch.randn(n, generator=gen) for j in range(3)], 1)
        return logits, match.numpy()

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x

    ref_logits, ref_match = draw(2000)
    reference = (ref_logits, head_targets({"match": ref_match}, "agreement"))
    population, population_match = draw(200_000)
    failures = 0
    for _ in range(60):
        logits, match = draw(400)
        cal = certify_thresholds(Fixed(), logits, match, tolerance, delta, reference, savings=savings)
        assert cal.family == "savings"
        exits = first_exit(population, torch.tensor([math.inf if t is None else t for t in cal.logits])).numpy()
        failures += float((~agrees_at(population_match, exits)).mean()) > tolerance
    assert failures <= 60 * delta + 5  # binomial slack over 60 draws
    with pytest.raises(ValueError, match="savings needs reference"):
        certify_thresholds(Fixed(), logits, match, tolerance, delta, savings=savings)
    with pytest.raises(ValueError, match="3 finite values"):
        certify_thresholds(Fixed(), logits, match, tolerance, delta, reference, savings=torch.zeros(3))


def test_grouped_certificate_refuses_what_one_bad_group_breaks():
    """Every sample exits at K = 1 at any λ below sigmoid(5); 12 of group b's 1,000 then disagree, none of a's.
    Pooled (12 / 2,000) certifies 1% at δ = 0.1 and fires; per group (b: 12 / 1,000 at δ / 2) nothing can be
    certified where anyone exits, so the heads never fire on these samples; the record carries each group's size."""

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x

    n = 1000
    logits = torch.full((2 * n, 1), 5.0)
    match = np.ones((2 * n, 2), dtype=bool)
    match[n : n + 12, 1] = False  # group b's first 12 change their answer at K = 1
    groups = np.array(["a"] * n + ["b"] * n)
    pooled = certify_thresholds(Fixed(), logits, match, 0.01, 0.1)
    assert pooled.logits[0] is not None and pooled.result.errors == 12 and pooled.result.exit_rate == 1.0
    grouped = certify_thresholds(Fixed(), logits, match, 0.01, 0.1, groups=groups)
    assert grouped.logits[0] > 5.0 and grouped.result.exit_rate == 0.0 and grouped.result.errors == 0
    record = grouped.record()
    assert record["group_sizes"] == {"a": n, "b": n} and record["level"] == pytest.approx(0.05)
    # with b clean, the grouped rule certifies the same exit and records each group's errors and p-value
    clean = certify_thresholds(Fixed(), logits, np.ones((2 * n, 2), dtype=bool), 0.01, 0.1, groups=groups)
    assert clean.logits[0] is not None and set(clean.record()["groups"]) == {"a", "b"}
    assert all(g["errors"] == 0 and g["p_value"] <= 0.05 for g in clean.record()["groups"].values())
    # a margin of 0.5 refuses the pooled exit that 12 / 2,000 certified at margin 0 (0.5% is not certified)
    assert certify_thresholds(Fixed(), logits, match, 0.01, 0.1, margin=0.5).result.exit_rate == 0.0
    with pytest.raises(ValueError, match="one label per calibration sample"):
        certify_thresholds(Fixed(), logits, match, 0.01, 0.1, groups=groups[:10])


@pytest.fixture(scope="module")
def demo():
    from dyvte.demo import load_demo_dataset, load_demo_model, load_demo_processor
    from tests.scripts import REPO_ROOT

    model, processor = load_demo_model(), load_demo_processor()
    heads = ExitHeads.from_pretrained(REPO_ROOT / "checkpoints" / "demo-exit-heads")
    return model, processor, heads, list(load_demo_dataset("test").select(range(24)))


def test_offline_scoring_equals_the_engine(demo):
    """Exit layers from cached features == the engine's exit layers; agreement from the cache == generation."""
    model, processor, heads, records = demo
    with torch.no_grad():
        columns = label_batch(model, processor, records)
        logits = heads(torch.as_tensor(columns["features"])).float()
    inputs = build_inputs(processor, records)
    with torch.no_grad():
        full = model.generate(**inputs, max_new_tokens=8, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    for threshold in (0.5, 0.9):
        expected = first_exit(logits, heads.exit_logits(threshold))
        with dyvte.withdraw(model, heads=heads, threshold=threshold) as handle, torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False)[:, inputs["input_ids"].shape[1] :]
            exits = handle.exit_layers.clone()
        assert exits.tolist() == expected.tolist(), threshold
        assert len(set(exits.tolist())) > 1  # a real mix of exits
        texts = processor.tokenizer.batch_decode(out, skip_special_tokens=True)
        reference = processor.tokenizer.batch_decode(full, skip_special_tokens=True)
        same = [a == b for a, b in zip(texts, reference, strict=True)]
        assert outcome(columns, exits)["agree"].tolist() == same, threshold


def test_calibrated_thresholds_are_the_default_and_threshold_overrides(demo, tmp_path):
    model, processor, heads, records = demo
    with torch.no_grad():
        columns = label_batch(model, processor, records)
    features = torch.as_tensor(columns["features"])
    calibration = certify_thresholds(heads, features, columns["match"], tolerance=0.5, delta=0.2)
    assert calibration.result.parameter is not None and calibration.family == "global"
    heads = ExitHeads.from_pretrained(heads.save_pretrained(tmp_path / "copy"))  # the module fixture stays as it is
    heads.config.thresholds, heads.config.calibration = calibration.thresholds, calibration.record()
    heads.config.threshold_logits = calibration.logits
    heads.save_pretrained(tmp_path)
    loaded = ExitHeads.from_pretrained(tmp_path)
    assert loaded.config.thresholds == calibration.thresholds and loaded.config.calibration["tolerance"] == 0.5
    assert loaded.config.threshold_logits == calibration.logits
    inputs = build_inputs(processor, records)
    logits = loaded(features).float()
    with dyvte.withdraw(model, heads=loaded) as handle, torch.no_grad():
        model(**inputs)
        default = handle.exit_layers.clone()
    saved = torch.tensor([math.inf if t is None else t for t in calibration.logits])
    assert default.tolist() == first_exit(logits, saved).tolist()
    with dyvte.withdraw(model, heads=loaded, threshold=0.99) as handle, torch.no_grad():
        model(**inputs)
        assert handle.exit_layers.tolist() == first_exit(logits, exit_logit(torch.full((7,), 0.99))).tolist()
    # the saved logits are what fires: a head set to never (null) never fires, whatever its P(exit) threshold says
    never = ExitHeads.from_pretrained(tmp_path)
    never.config.threshold_logits = [None] * 7
    with dyvte.withdraw(model, heads=never) as handle, torch.no_grad():
        model(**inputs)
        assert handle.exit_layers.tolist() == [8] * len(records)
    for bad, message in (([0.0] * 6, "one per head"), ([math.nan] * 7, "finite numbers or null")):
        with pytest.raises(ValueError, match=message):
            ExitHeadsConfig("llava", 128, 8, threshold_logits=bad)
    # the readable P(exit) copy must say what fires: an edited threshold next to saved logits is refused, not ignored
    edited = list(calibration.thresholds)
    edited[0] = 0.5 if edited[0] != 0.5 else 0.6
    with pytest.raises(ValueError, match=r"disagree at heads \[0\]"):
        ExitHeadsConfig("llava", 128, 8, thresholds=edited, threshold_logits=calibration.logits)
    with pytest.raises(ValueError, match=r"disagree at heads \[1\]"):
        ExitHeadsConfig("llava", 128, 8, thresholds=[0.5] * 7, threshold_logits=[0.0, None] + [0.0] * 5)
    ExitHeadsConfig("llava", 128, 8, thresholds=[0.5, NEVER] + [0.5] * 5, threshold_logits=[0.0, None] + [0.0] * 5)
    errors = int((~np.concatenate([columns["match"], np.ones((24, 1), bool)], 1)[np.arange(24), default.numpy()]).sum())
    assert errors == calibration.result.errors
