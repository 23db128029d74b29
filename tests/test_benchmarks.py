"""The matched-budget settings of benchmarks/methods.py: within budget, and each does what it is named for."""

from __future__ import annotations

import pytest
import torch

import dyvte
from dyvte.engine.compat import cache_out
from dyvte.eval.benchmark import LlavaShape, Qwen3_5Shape, build_random_llava, kv_cache_bytes, llava_prompt

from .scripts import load_script

SHAPE = LlavaShape(
    hidden_size=64, num_layers=6, intermediate_size=128, num_heads=4, num_kv_heads=4, image_size=112, patch_size=14
)


@pytest.mark.parametrize("target", [0.7, 0.5])
def test_settings_fit_the_budget_and_leave_the_cache_they_claim(target):
    script = load_script("benchmarks/methods.py")
    model = build_random_llava(SHAPE, dtype=torch.float32)
    inputs = llava_prompt(SHAPE, text_before=5, text_after=7, dtype=torch.float32)
    tokens, visual = inputs["input_ids"].shape[1], SHAPE.image_tokens
    found = script.settings(model, tokens, visual, target, fastv_layer=2)
    assert {s.method for s in found} == {"static", "exit heads", "fastervlm", "random", "fastv K=2"}
    for s in found:
        assert s.flops <= target
        with s.context() as handle, torch.no_grad():
            cache = cache_out(model(**inputs, logits_to_keep=1, use_cache=True))
        if s.method in ("static", "exit heads"):  # forced heads exit exactly where static withdrawal does
            layer = int(s.budget.split("=")[-1].split()[-1])
            assert handle.exit_layers.tolist() == [layer]
            assert kv_cache_bytes(cache) == dyvte.prefill_kv_bytes(model.config, tokens, visual, layer)
        elif s.method.startswith("fastv"):
            after = handle.visual_after[0]
            assert kv_cache_bytes(cache) == dyvte.prefill_kv_bytes(model.config, tokens, visual, 2, visual_after=after)
        else:
            kept = int(s.budget.split()[1].split("/")[0])
            assert int(handle.fed_visual[0]) == kept
            assert kv_cache_bytes(cache) == dyvte.prefill_kv_bytes(model.config, tokens - visual + kept, kept)


def test_decode_benchmark_rows_repeat_alike_and_hold_the_kv_they_claim():
    """benchmarks/decode.py on a small shape: repeated rows decode alike, and the KV held after the last step is the
    prefill's formula at the grown prompt length, times the batch (the mix: the sum over its rows, padded per layer
    to its widest row)."""
    script = load_script("benchmarks/decode.py")
    shape = LlavaShape(hidden_size=64, num_layers=8, intermediate_size=128, num_heads=4, num_kv_heads=4, image_size=112)
    model = build_random_llava(shape, dtype=torch.float32)
    steps, batches = 3, [1, 4, 8]
    tokens = 35 + shape.image_tokens + 40
    for name, exits in script.methods(8, (1, 1, 8, 8)).items():
        rows = script.cpu_rows(model, shape, name, exits, batches, steps)
        assert [row.tokens_equal for row in rows][-1] is True
        for index, row in enumerate(rows):
            grown = tokens + steps * (index + 1)  # each step feeds one token
            if exits is None or len(exits) == 1:
                layer = shape.num_layers if exits is None else exits[0]
                one = dyvte.prefill_kv_bytes(model.config, grown, shape.image_tokens, layer)
                assert row.kv_bytes == row.batch * one, (name, row.batch)
            else:  # layers < 8 hold every row at the widest row's length (rows still in): no saving below K = 8
                assert row.kv_bytes == row.batch * dyvte.prefill_kv_bytes(model.config, grown, shape.image_tokens, 8)


def test_hybrid_prefill_rows_on_a_tiny_qwen3_5_shape():
    """benchmarks/prefill.py --family qwen3_5 on a tiny shape: the KV bytes shrink with withdrawal, the linear
    layers' state does not, and the FLOPs ideal falls to 1 at K = L."""
    script = load_script("benchmarks/prefill.py")
    shape = Qwen3_5Shape(
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        linear_key_heads=2,
        linear_value_heads=4,
        linear_head_dim=16,
        image_tokens=40,
    )
    rows = script.hybrid_rows(shape, ["fp32"], runs=1)
    assert [row["K"] for row in rows] == [0, 1, 2, 3, 4]
    assert rows[-1]["ideal"] == 1.0 and all(row["ideal"] > 1.0 for row in rows[:-1])
    assert all(row["kv"] < rows[-1]["kv"] for row in rows[:-1])
    assert len({row["state"] for row in rows}) == 1 and rows[0]["state"] > 0
    assert "| fp32 | 4 |" in script.hybrid_table(shape, rows)


def test_serving_smoke_runs_the_gpu_scripts_code_path_on_cpu(tmp_path, capsys):
    """benchmarks/gpu.sh runs ``benchmarks/serving.py`` (CUDA, LLaVA-7B shape, bf16); its ``--device cpu --smoke``
    twin here (without the compiled mode, which compiles for minutes on CPU): every policy in each mode, the tokens of
    each policy equal across modes, and the Markdown table written where ``--output`` says."""
    script = load_script("benchmarks/serving.py")
    out = tmp_path / "tables" / "serving.md"
    text = script.main(["--device", "cpu", "--smoke", "--modes", "dynamic", "static", "--output", str(out)])
    assert out.read_text() == text and text in capsys.readouterr().out
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [(r[0].lstrip("| "), r[1]) for r in rows] == [
        (policy, mode)
        for policy in ("full", "static K=1", "per-row K=[1, 4]", "exit heads (random, p=0.5)")
        for mode in ("dynamic", "static")
    ]
    assert all(r[3] == "yes" for r in rows)
    assert "L=4 d=64" in text and "random weights" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_serving_refuses_cuda_without_it_before_building_a_model(capsys):
    script = load_script("benchmarks/serving.py")
    with pytest.raises(SystemExit):
        script.parse_args(["--device", "cuda"])
    assert "--device 'cuda': CUDA is not available on this machine" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_script_stops_at_once_without_cuda_and_without_an_output(tmp_path):
    import os
    import subprocess
    import sys

    from .scripts import REPO_ROOT

    env = {**os.environ, "PYTHON": sys.executable}
    script = str(REPO_ROOT / "benchmarks" / "gpu.sh")
    done = subprocess.run(["bash", script, str(tmp_path / "gpu.md")], env=env, capture_output=True, text=True)
    assert done.returncode == 1 and "CUDA is not available on this machine" in done.stderr
    assert "--smoke" in done.stderr and not (tmp_path / "gpu.md").exists()
    done = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "usage:" in done.stderr


def test_validation_half_scenes_keep_to_their_half_and_continue_their_stream():
    """benchmarks/heads_data.py's heads learn from scenes of one validation half, labelled in chunks: each chunk is the
    continuation of the same stream (so chunks add up to the scenes one call would draw), every digit image comes
    from the half, and the training stream is not the calibration stream."""
    from dyvte.demo.data import split_digit_pools

    ms = load_script("benchmarks/margin_shift.py")
    halves = ms.pool_halves()
    assert not set(halves["A"]) & set(halves["B"])
    assert sorted([*halves["A"], *halves["B"]]) == sorted(split_digit_pools(0)["validation"])
    whole = ms.half_records("A", halves["A"], 10, stream=8)
    tail = ms.half_records("A", halves["A"], 10, stream=8, start=6)
    assert tail["question"] == whole["question"][6:] and tail["sources"] == whole["sources"][6:]
    assert {s for scene in whole["sources"] for s in scene if s >= 0} <= set(halves["A"].tolist())
    assert ms.half_records("A", halves["A"], 10)["sources"] != whole["sources"]  # stream 7: the calibration scenes


def test_margin_measurement_certifies_on_one_set_and_scores_another():
    """benchmarks/margin_shift.py's per-margin measurement (shared with heads_data.py): heads that know every sample's
    safe layer exit each sample at it (all of the oracle's savings, no disagreement); noisy heads keep the certified
    rate on the calibration records, and a larger margin never saves more."""
    import numpy as np

    ms = load_script("benchmarks/margin_shift.py")
    rng = np.random.default_rng(0)
    n, layers = 6000, 8

    def columns(count: int) -> dict[str, np.ndarray]:
        safe = rng.integers(1, layers + 1, count)  # each sample's smallest safe K, 1..L (L: never)
        match = np.arange(layers)[None] >= safe[:, None]  # (N, L) agreement at K = 0..L-1
        return {
            "match": match,
            "correct": np.concatenate([match, np.ones((count, 1), bool)], axis=1),
            "features": np.zeros((count, layers - 1, 2), np.float32),
            "tokens": np.full(count, 120),
            "visual": np.full(count, 100),
            "safe": safe,
        }

    source, held = columns(n), columns(n)

    class Heads(torch.nn.Module):
        def __init__(self, noise: float) -> None:
            super().__init__()
            self.noise = noise

        def forward(self, features: torch.Tensor) -> torch.Tensor:  # logit = +4 where safe from K = j + 1
            return features[..., 0] + self.noise * features[..., 1]

    for cols in (source, held):
        safe_from = np.arange(1, layers)[None] >= cols["safe"][:, None]  # (N, L-1)
        cols["features"][..., 0] = np.where(safe_from, 4.0, -4.0)
        cols["features"][..., 1] = rng.standard_normal(safe_from.shape)
    d = ms.direction(source, held)
    assert len(d["cal"]["match"]) == n - ms.REFERENCE
    perfect = ms.measure(Heads(0.0), d, [0.0, 0.25], 0.01, 0.1)
    assert [r["disagreement"] for r in perfect] == [0.0, 0.0] and [r["calibration_rate"] for r in perfect] == [0, 0]
    assert all(r["share"] == pytest.approx(1.0) for r in perfect)
    noisy = ms.measure(Heads(3.0), d, [0.0, 0.25, 0.5], 0.01, 0.1)
    for r in noisy:
        assert 0 < r["calibration_rate"] <= 0.01 * (1 - r["margin"])
        assert 0 < r["share"] < 1
    assert noisy[0]["share"] >= noisy[1]["share"] >= noisy[2]["share"]


def test_benchmark_rows_with_visual_heads_read_the_visual_columns():
    """``--visual_inputs`` in the heads benchmarks: a row's heads are shaped for ``features`` + ``visual_features``
    (``4d``), are certified and scored on both, and a cache without the visual column is refused, not read short."""
    import numpy as np

    ab = load_script("train/ablate_heads.py")
    ms = load_script("benchmarks/margin_shift.py")
    rng = np.random.default_rng(1)
    layers, d = 8, 3  # the demo's depth: FLOPs and savings are read from its config

    def columns(count: int) -> dict[str, np.ndarray]:
        safe = rng.integers(1, layers + 1, count)
        match = np.arange(layers)[None] >= safe[:, None]  # (N, L)
        safe_from = (np.arange(1, layers)[None] >= safe[:, None]).astype(np.float32)  # (N, L-1)
        visual = rng.standard_normal((count, layers - 1, 2 * d)).astype(np.float32)
        visual[..., 0] = 4 * safe_from - 2  # only the visual column says when a sample is safe
        return {
            "match": match,
            "correct": np.concatenate([match, np.ones((count, 1), bool)], axis=1),
            "features": rng.standard_normal((count, layers - 1, 2 * d)).astype(np.float32),
            "visual_features": visual,
            "kl": np.zeros((count, layers), np.float32),
            "dyvte": match,
            "tokens": np.full(count, 120),
            "visual": np.full(count, 100),
        }

    caches = {"train": columns(512), "val": columns(128)}
    heads = ab.train_row(ab.Row("visual", train=512, visual=True), caches, seed=0, epochs=3)
    assert heads.config.visual_inputs and heads.config.input_size == 4 * d and ab.reads_visual(heads)
    source, held = columns(2500), columns(2000)
    d_ = ms.direction(source, held, visual=True)
    (row,) = ms.measure(heads, d_, [0.0], 0.05, 0.1)
    assert row["share"] > 0.5 and row["disagreement"] <= 0.05  # the heads learned from the visual column
    with pytest.raises(ValueError, match="no visual_features column"):
        ms.direction({k: v for k, v in source.items() if k != "visual_features"}, held, visual=True)
