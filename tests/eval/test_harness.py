"""The evaluation harness (dyvte.eval.harness) on a tiny LLaVA and a tiny (image, question, answer) dataset.

Accuracy, agreement, relative FLOPs and KV bytes per method and question type, results saved and loaded, tables and
plots; the oracle exit on hand-built results; bad datasets refused before generating; the relative FLOPs of pruning
(FasterVLM: a shorter prompt; FastV: fewer visual tokens after K); a model in training mode evaluated in eval mode.
Method strings are ``tests/eval/test_methods.py``'s.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

import dyvte
from dyvte.data.records import DataError, build_inputs
from dyvte.engine.registry import resolve
from dyvte.eval.harness import format_per_type, format_table, plot_sweep
from dyvte.eval.methods import PruningRun, parse_method

from ..oracle import expected_kept
from ..tiny_models import TEMPLATE, make_tiny, records

VIEW = 16  # patches per image of the tiny LLaVA (CLIP 32 px / patch 8)


@pytest.fixture(scope="module")
def tiny():
    model, processor = make_tiny("llava")
    processor.chat_template = TEMPLATE
    return model, processor


def test_harness_accuracy_agreement_flops(tiny, tmp_path):
    model, processor = tiny
    recs = records(6)
    first = dyvte.evaluate(model, processor, recs, batch_size=4, max_new_tokens=2, progress=False)
    for i, rec in enumerate(recs):  # rows 0, 2, 4 answer right by construction, the others wrong
        rec["answer"] = first.answers[i] if i % 2 == 0 else "definitely-not-generated"
    full = dyvte.evaluate(model, processor, recs, batch_size=4, max_new_tokens=2, progress=False)
    assert full.answers == first.answers  # deterministic, batch-size independent of nothing else
    assert full.metrics["all"]["accuracy"] == pytest.approx(0.5)
    assert full.metrics["a"]["accuracy"] == 1.0 and full.metrics["b"]["accuracy"] == 0.0
    assert full.metrics["all"]["agreement"] == 1.0 and full.metrics["all"]["relative_flops"] == 1.0
    assert 0 < full.metrics["all"]["prefill_ms_p10"] <= full.metrics["all"]["prefill_ms_p90"]  # over the 2 batches
    never = dyvte.evaluate(
        model,
        processor,
        recs,
        dyvte.PolicyRun("static", {"layer": 4}),
        reference=full,
        batch_size=3,
        max_new_tokens=2,
        progress=False,
    )
    assert never.answers == full.answers and never.metrics["all"]["agreement"] == 1.0
    zero = dyvte.evaluate(
        model,
        processor,
        recs,
        dyvte.PolicyRun("static", {"layer": 0}),
        reference=full,
        batch_size=3,
        max_new_tokens=2,
        progress=False,
    )
    assert zero.exit_layers == [0] * 6
    inputs = build_inputs(processor, recs)
    visual = (inputs["input_ids"] == model.config.image_token_id).sum(1)
    expected = dyvte.prefill_flops(model.config, inputs["attention_mask"].sum(1), visual, 0).ratio
    assert zero.relative_flops == pytest.approx(expected.tolist())
    kv = [dyvte.prefill_kv_bytes(model.config, inputs["attention_mask"].sum(1), visual, k) for k in (0, None)]
    assert zero.metrics["all"]["kv_bytes"] == pytest.approx(float(kv[0].mean()))
    assert full.metrics["all"]["kv_bytes"] == pytest.approx(float(kv[1].mean()))
    assert zero.metrics["all"]["kv_bytes"] < full.metrics["all"]["kv_bytes"]
    agree = np.mean([a == b for a, b in zip(zero.answers, full.answers, strict=True)])
    assert zero.metrics["all"]["agreement"] == pytest.approx(agree)
    full.save(tmp_path / "full.json")
    assert dyvte.EvalResult.load(tmp_path / "full.json") == full
    plot_sweep([full, never, zero], tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert "static K=0" in format_table([full, zero]) and "| a | b | all |" in format_per_type([full])
    assert json.loads((tmp_path / "full.json").read_text())["metrics"]["all"]["samples"] == 6


def test_bad_datasets(tiny):
    model, processor = tiny
    recs = records(3)
    with pytest.raises(dyvte.DataError, match="empty"):
        dyvte.evaluate(model, processor, [], progress=False)
    broken = [dict(r) for r in recs]
    broken[1]["image"] = None
    with pytest.raises(dyvte.DataError, match="record 1 has no image"):
        dyvte.evaluate(model, processor, broken, progress=False)
    broken = [dict(r) for r in recs]
    broken[2]["answer"] = "zzqx-unknown-word"
    with pytest.raises(dyvte.DataError, match="cannot express"):
        build_inputs(processor, broken, with_answers=True)


def test_oracle_exit_on_hand_built_results():
    from dyvte.eval.harness import EvalResult, format_histogram, oracle_exit

    def result(answers, flops):
        return EvalResult("x", {}, answers, [0] * len(answers), flops, ["a", "b", "a"])

    full = result(["1", "2", "3"], [1.0] * 3)
    static = {  # L = 3; sample 0 safe from K=1, sample 1 only at K=3 (K=2 wrong), sample 2 from K=0
        0: result(["9", "2", "3"], [0.2, 0.2, 0.2]),
        1: result(["1", "2", "3"], [0.4, 0.4, 0.4]),
        2: result(["1", "9", "3"], [0.7, 0.7, 0.7]),
        3: full,
    }
    layers, flops = oracle_exit(full, static)
    assert layers == [1, 3, 0] and flops == [0.4, 1.0, 0.2]
    table = format_histogram(layers, full.qtypes, 3)
    assert "| a | 1 | 1 | 0 | 0 | 0.50 |" in table and "| all | 1 | 1 | 0 | 1 | 1.33 |" in table
    with pytest.raises(ValueError, match="every K"):
        oracle_exit(full, {0: static[0], 3: full})


# ------------------------------------------------------------------------------------------------- pruning
def test_flops_and_harness():
    flops = dyvte.prefill_flops
    model, processor = make_tiny("llava")
    cfg = model.config
    layers = cfg.text_config.num_hidden_layers
    got = flops(cfg, 40, 16, 2, visual_after=4, convention="paper")
    per_layer = lambda n: float(dyvte.eval.flops.layer_flops(cfg, n, "paper"))  # noqa: E731
    assert got.flops == pytest.approx(2 * per_layer(40) + (layers - 2) * per_layer(40 - 16 + 4))
    assert flops(cfg, 40, 16, 2, visual_after=16).ratio == 1.0
    assert flops(cfg, 40, 16, 2).flops == flops(cfg, 40, 16, 2, visual_after=0).flops
    with pytest.raises(ValueError, match="visual_after"):
        flops(cfg, 40, 16, 2, visual_after=17)

    names = [m.name for m in parse_method("fastervlm:0.75,0.9", layers) + parse_method("fastv:2:0.5", layers)]
    assert names == ["fastervlm R=0.75", "fastervlm R=0.9", "fastv K=2 R=0.5"]
    assert parse_method("random:0.5", layers)[0] == PruningRun("random", {"ratio": 0.5})
    processor.chat_template = TEMPLATE
    data = records(4)
    full = dyvte.evaluate(model, processor, data, batch_size=2, progress=False)
    assert full.relative_flops == [1.0] * len(data)
    # each record alone: its tokens (padding excluded) and visual tokens, and what the documented budget keeps
    alone = [build_inputs(processor, [r]) for r in data]
    tokens = torch.tensor([int(x["attention_mask"].sum()) for x in alone])
    visual = torch.tensor([int(torch.isin(x["input_ids"], resolve(model).visual_ids).sum()) for x in alone])
    assert visual.tolist() == [VIEW] * len(data)
    kept = torch.tensor([expected_kept(int(v), 0.75) for v in visual])  # 16 -> 4
    unpruned = flops(cfg, tokens, visual).full  # the reference of "relative": the full model on the full prompt
    expected = {  # FasterVLM: the LLM receives a shorter prompt; FastV: layers >= K see the kept visual tokens
        "fastervlm": flops(cfg, tokens - visual + kept, kept).full / unpruned,
        "fastv": flops(cfg, tokens, visual, 2, visual_after=kept).flops / unpruned,
    }
    for method in (PruningRun("fastervlm", {"ratio": 0.75}), PruningRun("fastv", {"ratio": 0.75, "layer": 2})):
        result = dyvte.evaluate(model, processor, data, method, reference=full, batch_size=2, progress=False)
        assert result.relative_flops == pytest.approx(expected[method.method].tolist(), rel=1e-12)
        assert result.flops == pytest.approx(float(expected[method.method].mean()), rel=1e-6)
        assert result.exit_layers == [2 if method.method == "fastv" else layers] * len(data)


# ------------------------------------------------------------------------------------------- training mode
def _flags(model: torch.nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def test_dropout_is_real_in_training_mode(dropout_model):
    model, processor = dropout_model
    inputs = build_inputs(processor, records(2))
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, model(**inputs).logits)


def test_evaluation_of_a_model_in_training_mode_runs_in_eval_mode(dropout_model, caplog):
    model, processor = dropout_model
    recs = records(6)
    kwargs = {"batch_size": 3, "max_new_tokens": 2, "progress": False}
    reference = dyvte.evaluate(model, processor, recs, dyvte.PolicyRun("static", {"layer": 1}), **kwargs)
    model.train()
    model.model.vision_tower.eval()  # a mixed state must come back as it was, module by module
    flags = _flags(model)
    with caplog.at_level(logging.WARNING, logger="dyvte.utils.modes"):
        got = dyvte.evaluate(model, processor, recs, dyvte.PolicyRun("static", {"layer": 1}), **kwargs)
    assert "evaluate: the model was in training mode (dropout on); running it in eval mode" in caplog.text
    untimed = {group: {k: v for k, v in m.items() if "_ms" not in k} for group, m in got.metrics.items()}
    assert got.answers == reference.answers and got.exit_layers == reference.exit_layers
    assert untimed == {group: {k: v for k, v in m.items() if "_ms" not in k} for group, m in reference.metrics.items()}
    assert _flags(model) == flags


def test_evaluate_refuses_an_empty_gold_answer_before_generating():
    model, processor = make_tiny("llava")
    processor.chat_template = TEMPLATE
    recs = records(3)
    recs[2]["answer"] = ""
    with pytest.raises(DataError, match="record 2: the answer is empty"):
        dyvte.evaluate(model, processor, recs, progress=False)


# ------------------------------------------------------------------ the data path, on the demo model (issue 28)


@pytest.fixture(scope="module")
def demo():
    """The demo model and processor, and the first demo test scenes (grey ``L`` images, white ink on black)."""
    from dyvte.demo import load_demo_dataset, load_demo_model, load_demo_processor

    return load_demo_model(), load_demo_processor(), load_demo_dataset("test")


def _evaluate(model, processor, dataset) -> dyvte.EvalResult:
    return dyvte.evaluate(model, processor, dataset, batch_size=8, progress=False, warmup=False)


def _save_as(kind: str, grey: np.ndarray, path) -> None:
    """One demo scene saved so that a viewer shows exactly ``grey`` (the scene as its RGB image)."""
    from PIL import Image

    if kind == "plain":
        Image.fromarray(grey).save(path)
    elif kind == "rgba":  # black ink drawn only in alpha; over white it is the scene
        Image.fromarray(np.dstack([np.zeros_like(grey)] * 3 + [255 - grey])).save(path)
    elif kind == "la":
        Image.fromarray(np.dstack([np.zeros_like(grey), 255 - grey]), mode="LA").save(path)
    elif kind == "sixteen":  # a 16-bit greyscale PNG (I;16)
        Image.fromarray(grey.astype(np.uint16) * 257).save(path)
    elif kind in ("exif", "exif-jpeg"):  # stored rotated, with the EXIF tag that shows it upright
        exif = Image.Exif()
        exif[0x0112] = 6
        stored = Image.fromarray(grey).transpose(Image.Transpose.ROTATE_90)
        stored.save(path, exif=exif.tobytes(), **({"quality": 95} if kind == "exif-jpeg" else {}))


def test_images_saved_in_other_forms_give_the_demo_model_the_same_answers(demo, tmp_path):
    from dyvte.data.sources import load_records

    model, processor, scenes = demo
    scenes = list(scenes.select(range(8)))
    answers = {}
    for kind in ("plain", "rgba", "la", "sixteen", "exif", "exif-jpeg"):
        folder = tmp_path / kind
        folder.mkdir()
        rows = []
        for i, scene in enumerate(scenes):
            name = f"{i}.jpg" if kind.endswith("jpeg") else f"{i}.png"
            _save_as(kind, np.asarray(scene["image"]), folder / name)
            rows.append({"image": name, "question": scene["question"], "answer": scene["answer"], "qtype": "all"})
        (folder / "records.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        in_memory = [row | {"image": str(folder / row["image"])} for row in rows]  # absolute paths, in memory
        answers[kind, "paths"] = _evaluate(model, processor, in_memory).answers
        answers[kind, "records file"] = _evaluate(model, processor, load_records(str(folder / "records.jsonl"))).answers
    reference = _evaluate(model, processor, scenes)  # the demo's own PIL images
    assert reference.accuracy >= 0.75
    for (kind, path), got in answers.items():
        if kind != "exif-jpeg":  # lossless: the very scene
            assert got == reference.answers, (kind, path)
    assert answers["exif-jpeg", "paths"] == answers["exif-jpeg", "records file"]  # one file, one answer, any path


def test_gold_answers_pandas_wrote_as_floats_score_as_ints(demo, tmp_path):
    import pandas as pd

    from dyvte.data.sources import load_records

    model, processor, scenes = demo
    numeric = scenes.filter(lambda r: r["answer"].isdigit()).select(range(8))
    (tmp_path / "imgs").mkdir()
    rows = []
    for i, scene in enumerate(numeric):
        scene["image"].save(tmp_path / f"imgs/{i}.png")
        rows.append({"image": f"imgs/{i}.png", "question": scene["question"], "answer": int(scene["answer"])})
    pd.DataFrame(rows).to_parquet(tmp_path / "ints.parquet")
    floats = pd.DataFrame([*rows, rows[0] | {"answer": None}])  # a missing value: the column becomes float64
    assert floats["answer"].dtype == np.float64
    floats.to_parquet(tmp_path / "floats.parquet")

    reference = _evaluate(model, processor, numeric)  # the demo's string answers
    assert reference.accuracy >= 0.75
    ints = _evaluate(model, processor, load_records(str(tmp_path / "ints.parquet")))
    from_file = _evaluate(model, processor, load_records(str(tmp_path / "floats.parquet"), skip_bad_rows=True))
    in_memory = [record | {"answer": float(record["answer"])} for record in numeric]  # 3.0, never "3.0"
    for result in (ints, from_file, _evaluate(model, processor, in_memory)):
        assert result.accuracy == reference.accuracy and result.answers == reference.answers
    with pytest.raises(DataError, match=r"record 1 has no answer \(nan"):
        _evaluate(model, processor, [in_memory[0], in_memory[1] | {"answer": float("nan")}])


def test_a_question_with_the_image_placeholder_fails_before_generating(demo, monkeypatch):
    model, processor, scenes = demo
    recs = list(scenes.select(range(8)))
    recs[5] = recs[5] | {"question": "<image> " + recs[5]["question"]}
    calls = []
    monkeypatch.setattr(model, "generate", lambda *args, **kwargs: calls.append(1))
    with pytest.raises(DataError, match=r"record 5, the question: '<image> .*' contains '<image>'"):
        dyvte.evaluate(model, processor, recs, batch_size=2, progress=False)
    assert calls == []  # refused before the first of the 4 batches
