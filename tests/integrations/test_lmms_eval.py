"""The lmms-eval model ``dyvte`` (dyvte/integrations/lmms_eval.py) under the real ``python -m lmms_eval`` CLI.

The CLI runs the task ``dyvte_demo`` (dyvte/integrations/lmms_tasks, the demo's test split read from the committed
``checkpoints/demo-data``) and its accuracy, per-sample answers and exit layers must equal ``dyvte.evaluate`` (the
harness of ``train/evaluate.py``) on the same records with the same batch size; bad ``--model_args`` are refused with a
message naming them. Needs lmms-eval (``bash train/install_lmms_eval.sh``) and a dyvte install that declares the
``lmms_eval.models`` entry point (``pip install -e .``): skipped without them, failed where ``DYVTE_REQUIRE_TOOLS``
names ``lmms_eval`` (CI).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from ..scripts import REPO_ROOT
from ..tools import require_module

INSTALL = "bash train/install_lmms_eval.sh"
TASKS = REPO_ROOT / "dyvte" / "integrations" / "lmms_tasks"
DEMO_MODEL = "checkpoints/demo-mllm"
DEMO_HEADS = "checkpoints/demo-exit-heads"
LIMIT = 64  # records of the demo's test split, the first ones (lmms-eval's --limit)
BATCH = 16

pytestmark = pytest.mark.slow


def _require_lmms_eval():
    return require_module("lmms_eval", install=INSTALL)


def _require_entry_point() -> None:
    """The installed dyvte's ``lmms_eval.models`` entry point (what ``--model dyvte`` resolves through)."""
    _require_lmms_eval()
    found = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "dyvte"]
    if found:
        return
    message = "the installed dyvte declares no lmms_eval.models entry point 'dyvte': reinstall it (pip install -e .)"
    wanted = {p.strip() for p in os.environ.get("DYVTE_REQUIRE_TOOLS", "").split(",")}
    if "lmms_eval" in wanted or "all" in wanted:
        pytest.fail(message + " -- DYVTE_REQUIRE_TOOLS says lmms_eval must run")
    pytest.skip(message)


def _run_cli(tmp_path: Path, model_args: str, limit: int = LIMIT) -> subprocess.CompletedProcess:
    """``python -m lmms_eval --model dyvte ...`` from the repository root, offline, this checkout's dyvte first."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]),
    )
    command = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "dyvte",
        "--model_args",
        model_args,
        "--tasks",
        "dyvte_demo",
        "--include_path",
        str(TASKS),
        "--limit",
        str(limit),
        "--output_path",
        str(tmp_path / "out"),
        "--log_samples",
    ]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def _results(tmp_path: Path, run: subprocess.CompletedProcess) -> tuple[dict, list[dict]]:
    """lmms-eval's results JSON and its logged samples (in doc order)."""
    found = sorted((tmp_path / "out").rglob("*_results.json"))
    assert found, f"lmms-eval wrote no results (rc {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    results = json.loads(found[-1].read_text())
    samples_files = sorted((tmp_path / "out").rglob("*_samples_dyvte_demo.jsonl"))
    assert samples_files, "lmms-eval wrote no samples file (--log_samples)"
    samples = [json.loads(line) for line in samples_files[-1].read_text().splitlines() if line.strip()]
    return results, sorted(samples, key=lambda s: s["doc_id"])


@pytest.fixture(scope="module")
def harness():
    """``dyvte.evaluate`` on the first LIMIT test records of the demo: the full model and the demo's exit heads."""
    _require_lmms_eval()
    import dyvte
    from dyvte.data.sources import load_model
    from dyvte.demo import load_demo_dataset

    model, processor = load_model(str(REPO_ROOT / DEMO_MODEL))
    records = load_demo_dataset("test").select(range(LIMIT))
    (heads,) = dyvte.parse_method(f"heads:{REPO_ROOT / DEMO_HEADS}", 8)
    options = {"batch_size": BATCH, "progress": False, "warmup": False}
    full = dyvte.evaluate(model, processor, records, dyvte.Full(), **options)
    return {"full": full, "heads": dyvte.evaluate(model, processor, records, heads, reference=full, **options)}


@pytest.mark.parametrize(
    ("method", "key"), [(f"heads:{DEMO_HEADS}", "heads"), ("full", "full")], ids=["exit-heads", "full"]
)
def test_lmms_eval_cli_equals_the_harness(tmp_path, harness, method, key):
    """The real CLI's accuracy, answers, mean exit layer and FLOPs equal ``dyvte.evaluate`` on the same records."""
    _require_entry_point()
    from dyvte.data.answers import normalize_answer

    stats = tmp_path / "stats.jsonl"
    run = _run_cli(tmp_path, f"pretrained={DEMO_MODEL},method={method},batch_size={BATCH},stats_path={stats}")
    results, samples = _results(tmp_path, run)
    expected = harness[key]
    assert results["n-samples"]["dyvte_demo"]["effective"] == LIMIT
    assert results["results"]["dyvte_demo"]["exact_match,none"] == pytest.approx(expected.accuracy, abs=1e-9)
    responses = [s["filtered_resps"] for s in samples]  # the answer text (a one-item list in some versions)
    answers = [normalize_answer(r if isinstance(r, str) else r[0]) for r in responses]
    assert answers == expected.answers  # every answer, in the harness's normalized form
    rows = sorted((json.loads(line) for line in stats.read_text().splitlines()), key=lambda r: r["doc_id"])
    assert [r["doc_id"] for r in rows] == list(range(LIMIT))
    assert [r["exit_layer"] for r in rows] == expected.exit_layers
    assert [r["relative_flops"] for r in rows] == pytest.approx(expected.relative_flops, abs=1e-6)
    means = json.loads(stats.with_name("stats.means.json").read_text())["tasks"]["dyvte_demo"]
    assert means["samples"] == LIMIT
    assert means["exit_layer"] == pytest.approx(expected.metrics["all"]["exit_mean"], abs=1e-6)
    assert means["relative_flops"] == pytest.approx(expected.flops, abs=1e-6)
    assert means["visual_tokens"] == 36  # the demo's 6x6 patches, all fed (withdrawal removes them later)
    if key == "full":
        assert means["exit_layer"] == 8 and means["relative_flops"] == pytest.approx(1.0)
    else:  # the heads withdraw early on some rows: the measurement is not the full model's
        assert means["exit_layer"] < 8 and means["relative_flops"] < 1.0


def test_lmms_eval_cli_names_a_bad_method_and_writes_no_results(tmp_path):
    """lmms-eval's CLI logs the model's error (it exits 0 all the same): the method string and its expected form."""
    _require_entry_point()
    run = _run_cli(tmp_path, f"pretrained={DEMO_MODEL},method=stattic:4", limit=4)
    output = run.stdout + run.stderr
    assert "method 'stattic:4': unknown method 'stattic'" in output
    assert not list((tmp_path / "out").rglob("*_results.json"))


# ------------------------------------------------------------------------------------ in process (no CLI)


def test_lmms_eval_resolves_the_model_name_to_the_plugin():
    """``--model dyvte`` through lmms-eval's own registry (the entry point's manifest), and the legacy
    ``register_model`` registry, give the plugin class."""
    _require_entry_point()
    import lmms_eval.models
    from lmms_eval.api.registry import MODEL_REGISTRY

    from dyvte.integrations.lmms_eval import DyVTELMM

    assert "dyvte" in lmms_eval.models.list_available_models()
    assert lmms_eval.models.get_model("dyvte") is DyVTELMM
    assert MODEL_REGISTRY["dyvte"] is DyVTELMM


def _model(args: str):
    _require_lmms_eval()
    from dyvte.integrations.lmms_eval import DyVTELMM

    return DyVTELMM.create_from_arg_string(args, {"batch_size": 1, "max_batch_size": None, "device": None})


def _requests(kind: str, rows: list[tuple], task: str = "demo"):
    from lmms_eval.api.instance import Instance

    def doc_to_visual(doc):
        return [doc["image"]]

    def metadata(i: int) -> dict:
        return {"task": task, "doc_id": i, "repeats": 1}

    return [
        Instance(kind, (q, extra, doc_to_visual, i, task, "test"), idx=0, metadata=metadata(i))
        for i, (q, extra) in enumerate(rows)
    ]


@pytest.fixture(scope="module")
def records():
    from dyvte.demo import load_demo_dataset

    return load_demo_dataset("test").select(range(8))


def test_loglikelihood_of_the_greedy_answer_is_greedy_and_batches_equal_rows(records):
    """Under static withdrawal at K = 4, the answer ``generate_until`` gives is the greedy continuation in
    ``loglikelihood`` (one teacher-forced pass withdraws at the same K), another answer is not and scores lower, and
    a batch of 4 scores each row as alone."""
    lm = _model(f"pretrained={REPO_ROOT / DEMO_MODEL},method=static:4,batch_size=4")
    lm.task_dict = {"demo": {"test": records}}
    gen = {"max_new_tokens": 8, "until": ["\n\n"]}
    answers = lm.generate_until(_requests("generate_until", [(r["question"], gen) for r in records]))
    assert all(a.strip() for a in answers)
    questions = [r["question"] for r in records]
    scored = lm.loglikelihood(_requests("loglikelihood", list(zip(questions, answers, strict=True))))
    assert all(greedy for _, greedy in scored)
    others = ["7" if a.strip() != "7" else "2" for a in answers]
    wrong = lm.loglikelihood(_requests("loglikelihood", list(zip(questions, others, strict=True))))
    assert not any(greedy for _, greedy in wrong)
    assert all(w < s for (w, _), (s, _) in zip(wrong, scored, strict=True))
    lm.batch_size = 1
    alone = lm.loglikelihood(_requests("loglikelihood", list(zip(questions, answers, strict=True))))
    assert [s for s, _ in alone] == pytest.approx([s for s, _ in scored], abs=1e-4)
    assert {r["exit_layer"] for r in lm.sample_stats} == {4}
    assert len(lm.sample_stats) == 4 * len(records)


@pytest.mark.parametrize(
    ("visuals", "found"),
    [([], "got 0 visuals (none)"), (["a.mp4"], "got 1 visuals (str)"), (["two", "images"], "got 2 visuals")],
    ids=["text-only", "video-path", "two"],
)
def test_requests_without_exactly_one_image_are_named(records, visuals, found):
    """dyvte answers one image per question: a text-only, video or multi-image document names its task and doc."""
    from lmms_eval.api.instance import Instance

    from dyvte.data.errors import DataError

    lm = _model(f"pretrained={REPO_ROOT / DEMO_MODEL},method=full")
    lm.task_dict = {"videos": {"test": records}}
    images = [records[0]["image"]] * 2 if visuals == ["two", "images"] else visuals
    request = Instance(
        "generate_until",
        ("how many digits are there ?", {}, lambda doc: images, 3, "videos", "test"),
        idx=0,
        metadata={"task": "videos", "doc_id": 3, "repeats": 1},
    )
    with pytest.raises(DataError, match=re.escape("task 'videos', split 'test', doc 3") + ".*" + re.escape(found)):
        lm.generate_until([request])
    with pytest.raises(NotImplementedError, match="single-round tasks"):
        lm.generate_until_multi_round([request])


def test_sampling_settings_are_warned_once_and_decoding_stays_greedy(records, caplog):
    lm = _model(f"pretrained={REPO_ROOT / DEMO_MODEL},method=full,batch_size=4")
    lm.task_dict = {"demo": {"test": records}}
    greedy = lm.generate_until(_requests("generate_until", [(r["question"], {"until": ["\n\n"]}) for r in records]))
    sampled = {"do_sample": True, "temperature": 0.9, "until": ["\n\n"]}
    with caplog.at_level(logging.WARNING, logger="dyvte.integrations.lmms_eval"):
        again = lm.generate_until(_requests("generate_until", [(r["question"], dict(sampled)) for r in records]))
    assert again == greedy
    assert [r.getMessage() for r in caplog.records].count(
        "dyvte decodes greedily (as its harness measures); the task's sampling settings are ignored"
    ) == 1


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ("method=stattic:4", "MethodError", r"method 'stattic:4': unknown method 'stattic'; expected one of: full"),
        ("method=static:99", "MethodError", r"method 'static:99': .*99.*expected static:K"),
        ("method=static:4,6", "MethodError", r"'static:4,6' gives 2 methods .* one method per run"),
        ("method=", "MethodError", r"method is empty"),
        ("method=full,batch_size=auto", "ValueError", r"batch_size must be an int >= 1, got 'auto'"),
        ("method=full,max_new_tokens=0", "ValueError", r"max_new_tokens must be an int >= 1"),
        ("method=full,temperature=0.2", "ValueError", r"unknown temperature; expected some of pretrained, method"),
        ("method=full,allow_other_model=maybe", "ValueError", r"allow_other_model must be true or false"),
    ],
)
def test_bad_model_args_are_named(args, error, match):
    import dyvte

    expected = dyvte.MethodError if error == "MethodError" else ValueError
    with pytest.raises(expected, match=match):
        _model(f"pretrained={REPO_ROOT / DEMO_MODEL},{args}")


def test_a_method_typo_is_refused_before_the_model_loads(monkeypatch):
    import dyvte
    import dyvte.integrations.lmms_eval as plugin

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(plugin, "load_model", no_load)
    with pytest.raises(dyvte.MethodError, match="unknown method 'hedas'"):
        _model(f"pretrained={REPO_ROOT / DEMO_MODEL},method=hedas:x")


def test_a_missing_model_directory_is_named():
    with pytest.raises(FileNotFoundError, match="model directory .*nowhere does not exist"):
        _model("pretrained=/nowhere,method=full")


def test_heads_of_another_model_are_refused_before_any_request(tmp_path):
    """The demo's heads (8 layers, the demo's weights) on a tiny 4-layer LLaVA saved as a model directory."""
    from ..tiny_models import make_tiny

    model, processor = make_tiny("llava")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    spec = f"heads:{REPO_ROOT / DEMO_HEADS}"
    with pytest.raises(ValueError, match=re.escape(f"method {spec!r} (") + r".*cannot run on this model"):
        _model(f"pretrained={tmp_path / 'model'},method={spec}")


def test_model_args_commas_continue_a_value():
    _require_lmms_eval()
    from dyvte.integrations.lmms_eval import parse_model_args

    assert parse_model_args("pretrained=a,method=static:4,6,batch_size=2") == {
        "pretrained": "a",
        "method": "static:4,6",
        "batch_size": "2",
    }
    with pytest.raises(ValueError, match="batch_size is given twice"):
        parse_model_args("batch_size=1,batch_size=2")
    with pytest.raises(ValueError, match="'x' is not key=value"):
        parse_model_args("x,method=full")
