"""The launchers (``train/fit.py``, ``adapt.py``, ``evaluate.py``, ``calibrate.py``, ``ablate_splits.py``) on bad
arguments: each is refused with a message that names it, before any work, or handled correctly, never a silent wrong
answer.

Cases (docs/robustness.md): untrained weights saved as trained (fit / adapt with no optimizer step), validation on
the training records (fit holds records out of a single file), evaluate's late failures (every method checked before
the first forward, repeated methods run once, bad arguments before loading the model), calibrate's and
ablate_splits' arguments, and every launcher takes ``--prompt_template``; the ``--data.*`` / ``--model.*`` options
are checked by the Lightning data and head modules of dyvte.train when given, and its held-out splits are
disjoint and seeded. Method strings themselves are ``tests/eval/test_methods.py``'s.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import dyvte
import dyvte.data.sources
from dyvte.cli import evaluate as evaluate_cli
from dyvte.data.fingerprints import short_digests, split_digests
from dyvte.data.records import DataError
from dyvte.engine.fingerprint import model_fingerprint
from dyvte.policies.exit_heads import ExitHeads
from dyvte.train.label_data import ExitLabelData
from dyvte.train.options import DataSource, LabelOptions, SplitSizes
from dyvte.train.splits import DEMO_SPLIT_SIZES

from ..policies.test_policies import saved_calibration
from ..scripts import REPO_ROOT, fit_args, load_script, make_fit_setup
from ..tiny_models import make_batch, make_tiny, records

DEMO_HEADS = REPO_ROOT / "checkpoints" / "demo-exit-heads"  # made for the 8-layer demo model
DEMO_CALIBRATION = REPO_ROOT / "checkpoints" / "demo-calibration"


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory) -> Path:
    """A tiny 4-layer LLaVA in from_pretrained layout and 12 records in one JSONL file (no validation file)."""
    return make_fit_setup(tmp_path_factory.mktemp("bad-launchers"))


@pytest.fixture(scope="module")
def llava():
    model, processor = make_tiny("llava")
    return model, processor, dict(make_batch(processor, "llava", [[(32, 32)], [(32, 32), (32, 32)], []]))


def _forbid(*_args, **_kwargs):
    raise AssertionError("work started: the bad input should have been refused before it")


# ------------------------------------------------------------------------------ case 1: weights that never trained
@pytest.mark.parametrize(
    "option", ["--trainer.max_epochs=0", "--trainer.max_steps=0", "--trainer.limit_train_batches=0"]
)
def test_fit_refuses_a_run_without_training_steps_before_labelling(setup_dir, option, monkeypatch):
    """`fit.py --trainer.max_epochs 0` saved untrained heads (`steps: 0`); now refused before any labelling."""
    monkeypatch.setattr(dyvte.data.sources, "load_model", _forbid)  # labelling would load the MLLM first
    name = option.split(".")[1].split("=")[0]
    args = fit_args(setup_dir, f"heads-{name}", 1, [option, f"--data.labels.cache_dir={setup_dir / f'cache-{name}'}"])
    with pytest.raises(ValueError, match=re.escape(option) + r": training would run no optimizer step"):
        load_script("train/fit.py").main(args)
    assert not (setup_dir / f"heads-{name}").exists() and not (setup_dir / f"cache-{name}").exists()


def test_fit_writes_no_heads_when_training_ran_no_step(setup_dir, monkeypatch):
    """Whatever stopped training (here a fit that returns at once), global_step 0 writes no heads."""
    monkeypatch.setattr(pl.Trainer, "fit", lambda self, *args, **kwargs: None)
    with pytest.raises(RuntimeError, match=r"training ran no optimizer step .*untrained exit heads are not written"):
        load_script("train/fit.py").main(fit_args(setup_dir, "heads-nostep", 1))
    assert not (setup_dir / "heads-nostep").exists()


def _adapt_args(root: Path, out: str, *extra: str) -> list[str]:
    return [
        f"--model.model={root / 'model'}",
        "--model.rank=2",
        "--model.exit_layers=[1,4]",
        f"--data.data={root / 'records.jsonl'}",
        "--data.train_samples=4",
        "--data.val_samples=2",
        "--data.batch_size=4",
        "--trainer.max_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root / 'runs'}",
        f"--trainer.logger.init_args.save_dir={root / 'runs'}",
        f"--output_dir={root / out}",
        *extra,
    ]


def test_adapt_refuses_zero_steps_before_loading_the_model(setup_dir, monkeypatch):
    monkeypatch.setattr(dyvte.data.sources, "load_model", _forbid)
    with pytest.raises(ValueError, match=r"--trainer\.max_steps=0: training would run no optimizer step"):
        load_script("train/adapt.py").main(_adapt_args(setup_dir, "adapter-0", "--trainer.max_steps=0"))
    assert not (setup_dir / "adapter-0").exists()


def test_adapt_writes_no_adapter_when_training_ran_no_step(setup_dir, monkeypatch):
    monkeypatch.setattr(pl.Trainer, "fit", lambda self, *args, **kwargs: None)
    with pytest.raises(RuntimeError, match=r"no optimizer step .*untrained LoRA adapter weights are not written"):
        load_script("train/adapt.py").main(_adapt_args(setup_dir, "adapter-nostep"))
    assert not (setup_dir / "adapter-nostep").exists()


@pytest.mark.parametrize("launcher", ["fit", "adapt"])
def test_an_output_dir_that_is_a_file_is_refused_before_work(setup_dir, launcher, monkeypatch):
    monkeypatch.setattr(dyvte.data.sources, "load_model", _forbid)
    (setup_dir / "a-file").write_text("keep me\n")
    args = (
        fit_args(setup_dir, "a-file", 1)
        if launcher == "fit"
        else _adapt_args(setup_dir, "unused", f"--merged_dir={setup_dir / 'a-file'}")
    )
    option = "--output_dir" if launcher == "fit" else "--merged_dir"
    with pytest.raises(ValueError, match=f"{option} .*a-file is an existing file, not a directory"):
        load_script(f"train/{launcher}.py").main(args)
    assert (setup_dir / "a-file").read_text() == "keep me\n"


@pytest.mark.parametrize(("option", "value"), [("--tolerance", "0"), ("--tolerance", "1.5"), ("--delta", "1")])
def test_fit_refuses_a_promise_it_cannot_make_before_work(setup_dir, monkeypatch, option, value):
    monkeypatch.setattr(dyvte.data.sources, "load_model", _forbid)
    args = fit_args(setup_dir, "heads-promise", 1, [f"{option}={value}"])
    with pytest.raises(ValueError, match=f"{option} must be in \\(0, 1\\), got {float(value)!r}"):
        load_script("train/fit.py").main(args)
    assert not (setup_dir / "heads-promise").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("--margin=1", r"--margin must be in \[0, 1\) .*got 1\.0"),
        ("--margin=-0.1", r"--margin must be in \[0, 1\) .*got -0\.1"),
        ("--group_by=writer", r"--group_by must be one of none, qtype, got 'writer' .*only the qtype column"),
    ],
)
def test_fit_refuses_a_bad_margin_or_grouping_before_work(setup_dir, monkeypatch, extra, message):
    monkeypatch.setattr(dyvte.data.sources, "load_model", _forbid)
    cache = setup_dir / "cache-options"
    args = fit_args(setup_dir, "heads-options", 1, [extra, f"--data.labels.cache_dir={cache}"])
    with pytest.raises(ValueError, match=message):
        load_script("train/fit.py").main(args)
    assert not cache.exists() and not (setup_dir / "heads-options").exists()


@pytest.mark.parametrize(("grouping", "where"), [("none", "the calibration split"), ("qtype", "each qtype group")])
def test_fit_refuses_groups_or_a_margin_too_small_to_certify_before_labelling(setup_dir, monkeypatch, grouping, where):
    """The setup's 2 calibration records certify 70% at delta 0.1, but not 35% (margin 0.5): 6 would be needed
    pooled, more per qtype group (each at delta / G); refused before the model is loaded, naming the groups."""
    monkeypatch.setattr(dyvte.data.sources, "load_model", _forbid)
    cache = setup_dir / f"cache-groups-{grouping}"
    extra = ["--margin=0.5", f"--group_by={grouping}", f"--data.labels.cache_dir={cache}"]
    with pytest.raises(ValueError, match=f"certified at 35%.*needs more calibration records in {where} .*labelled"):
        load_script("train/fit.py").main(fit_args(setup_dir, "heads-groups", 1, extra))
    assert not cache.exists() and not (setup_dir / "heads-groups").exists()


def test_fit_refuses_a_calibration_split_too_small_for_its_promise_before_labelling(setup_dir, monkeypatch):
    """A 1% promise at delta 0.1 needs 230 calibration records: with the setup's 2, fit says so and what to change,
    before the model is loaded or anything is labelled; 0 calibration records is a choice (no promise), allowed."""
    monkeypatch.setattr(dyvte.data.sources, "load_model", _forbid)
    cache = setup_dir / "cache-small"
    args = fit_args(setup_dir, "heads-small", 1, ["--tolerance=0.01", f"--data.labels.cache_dir={cache}"])
    with pytest.raises(ValueError, match=r"--delta 0\.1 needs at least 230 calibration records .* this run has 2 "):
        load_script("train/fit.py").main(args)
    assert not cache.exists() and not (setup_dir / "heads-small").exists()
    with pytest.raises(ValueError, match=r"needs at least 460 calibration records"):  # 0.5%: twice as many
        load_script("train/fit.py").main([*args, "--tolerance=0.005"])


def test_fit_names_its_outputs_after_the_model(setup_dir, monkeypatch):
    """Without --output_dir and log folders, a user's model writes to runs/fit-<model folder name>, not fit-demo."""
    work = setup_dir / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    args = [a for a in fit_args(setup_dir, "unused", 1) if not a.startswith(("--output_dir", "--trainer.default_root"))]
    args = [a for a in args if not a.startswith("--trainer.logger")]
    summary = load_script("train/fit.py").main([*args, f"--data.labels.cache_dir={setup_dir / 'cache'}"])
    assert ExitHeads.from_pretrained(work / "runs" / "fit-model" / "exit-heads").config.num_layers == 4
    assert Path(summary["logs"]).is_relative_to(work / "runs" / "fit-model" / "logs")
    assert not (work / "runs" / "fit-demo").exists()


def test_fit_refuses_a_missing_resume_checkpoint(setup_dir, monkeypatch):
    monkeypatch.setattr(dyvte.data.sources, "load_model", _forbid)
    args = fit_args(setup_dir, "heads-resume", 1, [f"--ckpt_path={setup_dir / 'no.ckpt'}"])
    with pytest.raises(ValueError, match=r"--ckpt_path .*no\.ckpt: no such checkpoint file"):
        load_script("train/fit.py").main(args)


# -------------------------------------------------------------------- case 3: validation on the training records


def test_held_out_split_is_disjoint_and_seeded():
    from dyvte.train.splits import held_out_split

    train, val = held_out_split(12, 4, 8, seed=0)
    assert len(val) == 4 and len(train) == 8 and not set(train) & set(val)
    assert set(train) | set(val) == set(range(12))
    assert held_out_split(12, 4, 8, seed=0) == (train, val)  # deterministic for a seed
    assert any(held_out_split(12, 4, 8, seed=s)[1] != val for s in range(1, 5))  # and the seed matters
    assert held_out_split(12, 4, None, seed=0)[0] == train  # training takes the rest, in order
    with pytest.raises(ValueError, match="at least 1 must stay for training"):
        held_out_split(12, 12, None)


def test_label_data_holds_validation_out_of_a_single_records_file(setup_dir):
    jsonl = str(setup_dir / "records.jsonl")
    source = DataSource(model=str(setup_dir / "model"), data=jsonl)
    data = ExitLabelData(source, SplitSizes(train_samples=8, val_samples=4))
    parts = data.split_indices()  # calibration: calib_fraction (0.2) of 12 = 2 more records held out
    assert parts["val"] is not None and [len(parts[k]) for k in ("train", "val", "calib")] == [6, 4, 2]
    train, val, calib = (set(parts[k]) for k in ("train", "val", "calib"))
    assert not train & val and not calib & (train | val)
    again = ExitLabelData(source, SplitSizes(train_samples=8, val_samples=4))
    assert again.split_indices() == parts
    other = ExitLabelData(source, SplitSizes(train_samples=8, val_samples=4, split_seed=3))
    assert other.split_indices()["val"] != parts["val"]
    other = str(setup_dir / "other.jsonl")
    separate = ExitLabelData(
        DataSource(model=str(setup_dir / "model"), data=jsonl, val_data=other), SplitSizes(calib_samples=0)
    )
    assert separate.split_indices() == {"train": None, "val": None}  # a separate validation file: nothing carved
    demo = ExitLabelData(DataSource(data="demo"), SplitSizes(val_samples=2000, calib_samples=None))
    assert demo.split_indices() == {"train": None, "val": None, "calib": None}  # named splits: calibration follows
    sizes = DEMO_SPLIT_SIZES  # the demo data's sizes where none is given; any other source's come from its records
    assert demo.split_summary()["calib"] == f"demo [validation] records 2000..{1999 + sizes['calib_samples']}"
    assert ExitLabelData(DataSource(data="demo")).plan.counts() == {
        "train": sizes["train_samples"],
        "val": sizes["val_samples"],
        "calib": sizes["calib_samples"],
    }
    # sizes from the records given: 10% of a 500-record validation file validates (at least 100), the rest calibrates
    lines = (setup_dir / "records.jsonl").read_text().splitlines()
    (setup_dir / "val500.jsonl").write_text("\n".join(lines[i % len(lines)] for i in range(500)) + "\n")
    user = ExitLabelData(DataSource(data=jsonl, val_data=str(setup_dir / "val500.jsonl")))
    assert user.plan.counts() == {"train": 12, "val": 100, "calib": 400}
    assert user.split_summary()["calib"].endswith("records 100..499")
    assert [SplitSizes.platt_size(n) for n in (3, 150, 500, 5000, 15000, 10**6)] == [1, 75, 100, 500, 1500, 2000]
    fraction = ExitLabelData(source, SplitSizes(train_samples=None, val_samples=None))
    assert [len(v) for v in fraction.split_indices().values()] == [9, 1, 2]  # 10% of 12 (at least 1), 20% of 12
    none = ExitLabelData(source, SplitSizes(val_samples=4, calib_samples=0))
    assert [len(v) for v in none.split_indices().values()] == [8, 4]  # --data.splits.calib_samples 0: no calibration
    with pytest.raises(
        ValueError, match=r"--data\.splits\.calib_samples=9: calibration takes the records of .* none is left"
    ):
        ExitLabelData(DataSource(data="demo"), SplitSizes(val_samples=15000, calib_samples=9)).split_indices()
    with pytest.raises(ValueError, match=r"--data\.splits\.val_samples=12 .*held out of the 12 records"):
        ExitLabelData(source, SplitSizes(val_samples=12)).split_indices()


def test_fit_without_val_data_validates_on_held_out_records(setup_dir, caplog):
    """`fit.py --data.source.data file.jsonl` validated on its own training records; now on a held-out split."""
    cache = setup_dir / "cache-heldout"
    args = fit_args(setup_dir, "heads-heldout", 1, [f"--data.labels.cache_dir={cache}"])
    with caplog.at_level(logging.INFO):
        summary = load_script("train/fit.py").main(args)
    assert "validation: 4 records and calibration: 2 records held out at random (seed 0) from the 12 records of" in (
        caplog.text
    )
    # held out by index is not apart: the records were compared, and the log says so rather than "disjoint"
    assert "none of the validation or calibration records is a copy of a training record" in caplog.text
    assert "disjoint" not in caplog.text
    written = json.loads((setup_dir / "heads-heldout" / "training.json").read_text())
    assert written["validation_split"] == summary["validation_split"]
    expected = {
        "held_out": True,
        "source_records": 12,
        "seed": 0,
        "train_samples": 6,
        "val_samples": 4,
        "calib_samples": 2,
    }
    assert {k: v for k, v in written["validation_split"].items() if k != "source"} == expected
    assert written["val_samples"] == 4
    # the saved promise says what it covers and what delta means, and that 2 records make it loose
    calibration = written["calibration"]
    assert calibration["samples"] == 2 and written["promise"] == calibration["promise"]
    assert (
        "at most 70% of answers differ" in calibration["promise"]
        and "2 calibration records" in (calibration["promise"])
    )
    assert "in about 1 run in 10 the realized share may exceed 70%" in calibration["promise"]
    heads = ExitHeads.from_pretrained(setup_dir / "heads-heldout")
    assert heads.config.calibration["promise"] == calibration["promise"]
    # the heads keep their calibration records' digests (for evaluate's check), training.json does not repeat them
    calib_indices = json.loads((Path(written["label_cache"]["calib"]) / "meta.json").read_text())["source_indices"]
    calib_records = dyvte.data.sources.load_records(str(setup_dir / "records.jsonl")).select(calib_indices)
    assert heads.config.calibration["record_digests"] == short_digests(split_digests(calib_records))
    assert "record_digests" not in calibration
    from datasets import load_from_disk

    caches = {k: load_from_disk(v).with_format("torch")[:] for k, v in written["label_cache"].items()}
    train, val, calib = (caches[k]["features"] for k in ("train", "val", "calib"))
    assert len(train) == 6 and len(val) == 4 and len(calib) == 2
    for row in [*val, *calib]:  # no held-out sample is a training sample (identical features would say it is)
        assert not any(torch.equal(row, t) for t in train)
    meta = {k: json.loads((Path(v) / "meta.json").read_text()) for k, v in written["label_cache"].items()}
    held = [set(meta[k]["source_indices"]) for k in ("train", "val", "calib")]
    assert not held[0] & held[1] and not held[0] & held[2] and not held[1] & held[2]
    # the heads carry the fingerprint of the model that labelled their training data (issue 28)
    model, processor = dyvte.data.sources.load_model(str(setup_dir / "model"))
    fingerprint = model_fingerprint(model, processor)
    assert all(m["model_fingerprint"] == fingerprint for m in meta.values())
    assert ExitHeads.from_pretrained(setup_dir / "heads-heldout").config.model_fingerprint == fingerprint


# -------------------------------------------------------------------- evaluate: everything checked before work
def _counting_loader(monkeypatch, script, forwards: list[int]) -> None:
    """Make ``script.load_model`` count every forward of the model it loads (``script``: the module of the job)."""
    real = script.load_model

    def load(*args, **kwargs):
        model, processor = real(*args, **kwargs)
        model.register_forward_pre_hook(lambda *_: forwards.append(1))
        return model, processor

    monkeypatch.setattr(script, "load_model", load)


def test_evaluate_checks_every_method_before_the_full_model_runs(tmp_path, monkeypatch):
    """The issue's call: `'["static:0,1","static:9"]'` on the 8-layer demo ran full, K = 0, K = 1, then crashed."""
    script = evaluate_cli  # the module whose load_model main calls (train/evaluate.py only re-exports main)
    forwards: list[int] = []
    _counting_loader(monkeypatch, script, forwards)
    out = tmp_path / "eval"
    with pytest.raises(ValueError, match=r"method 'static:9': exit layer K 9 is out of range \[0, 8\]"):
        script.main(model="demo", data="demo", samples=4, methods=["static:0,1", "static:9"], output_dir=str(out))
    assert forwards == [] and not out.exists()


def _two_heads_named_alike(root: Path) -> list[str]:
    model = make_tiny("llava")[0]
    for seed, parent in enumerate(("a", "b")):  # two different sets of heads in folders of the same name
        torch.manual_seed(seed)
        ExitHeads.for_model(model, threshold=0.5).save_pretrained(root / parent / "heads")
    return [f"heads:{root / 'a' / 'heads'}:0.5", f"heads:{root / 'b' / 'heads'}:0.5"]


@pytest.mark.parametrize(
    ("methods", "match"),
    [
        (["full", "static:0,1", "static:5"], r"method 'static:5': exit layer K 5 is out of range \[0, 4\]"),
        (["full", f"heads:{DEMO_HEADS}:0.5"], r"made for model_type=llava, hidden_size=128, 8 layers"),
        (["full", f"calibrated:{DEMO_CALIBRATION}"], r"calibration made for llava with 8 layers"),
        (["static:1", "fastv:1:0.5+static:2"], r"method 'fastv:1:0.5\+static:2'.*expected A\+B"),
        (None, r"different methods under one name \('heads\(heads\) p=0.5'\)"),
    ],
)
def test_evaluate_refuses_bad_methods_before_any_forward(setup_dir, tmp_path, monkeypatch, methods, match):
    script = evaluate_cli  # the module whose load_model main calls (train/evaluate.py only re-exports main)
    forwards: list[int] = []
    _counting_loader(monkeypatch, script, forwards)
    methods = methods or _two_heads_named_alike(tmp_path)
    out = tmp_path / "eval"
    with pytest.raises(ValueError, match=match):
        script.main(
            model=str(setup_dir / "model"),
            data=str(setup_dir / "records.jsonl"),
            samples=2,
            methods=methods,
            output_dir=str(out),
        )
    assert forwards == [] and not out.exists()


def test_evaluate_runs_a_repeated_method_once(tmp_path):
    model, _ = make_tiny("llava")
    ExitHeads.for_model(model, threshold=0.5).save_pretrained(tmp_path / "heads")
    specs = ["static:all", "static:1", f"heads:{tmp_path / 'heads'}", f"heads:{tmp_path / 'heads'}:0.5,0.7"]
    names = [m.name for m in evaluate_cli.resolve_methods(specs, model, 4)]
    assert names == [f"static K={k}" for k in range(5)] + ["heads(heads) p=0.5", "heads(heads) p=0.7"]


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("samples", 0, r"--samples must be an int >= 1"),
        ("batch_size", 0, r"--batch_size must be an int >= 1, got 0"),
        ("max_new_tokens", 0, r"--max_new_tokens must be an int >= 1, got 0"),
        ("dtype", "float16", r"--dtype must be one of"),
        ("output_dir", "a-file", r"--output_dir .*a-file is an existing file, not a directory"),
        ("methods", "static:1", r"--methods must be a list of method strings"),
    ],
)
def test_evaluate_refuses_bad_arguments_before_loading_the_model(tmp_path, monkeypatch, option, value, match):
    script = evaluate_cli
    monkeypatch.setattr(script, "load_model", _forbid)
    (tmp_path / "a-file").write_text("keep me\n")
    if option == "output_dir":
        value = str(tmp_path / value)
    kwargs = {"output_dir": str(tmp_path / "eval"), option: value}
    with pytest.raises(ValueError, match=match):
        script.main(**kwargs)
    assert not (tmp_path / "eval").exists() and (tmp_path / "a-file").read_text() == "keep me\n"


#: the message every launcher gives for float16 on the CPU (dyvte.data.placement.check_dtype)
CPU_FP16 = (
    r"^--dtype must be one of \['bf16', 'bfloat16', 'float32', 'fp32'\] on CPU, got 'float16': float16 is ~100x "
    r"slower than float32 on CPU"
)


@pytest.mark.parametrize(
    ("job", "kwargs"),
    [
        ("dyvte.cli.evaluate", {"output_dir": "eval"}),  # train/evaluate.py, dyvte evaluate
        ("dyvte.cli.calibrate", {"output": "calibration"}),  # train/calibrate.py, dyvte calibrate
    ],
)
def test_launchers_refuse_float16_on_cpu_and_cuda_without_it_before_loading(tmp_path, monkeypatch, job, kwargs):
    """--dtype float16 with --device cpu (the default): one message on every launcher; --device cuda on a machine
    without CUDA, and a malformed --device, are refused before the model loads."""
    module = importlib.import_module(job)
    monkeypatch.setattr(module, "load_model", _forbid)
    kwargs = {key: str(tmp_path / value) for key, value in kwargs.items()}
    for device in ("cpu", None):
        extra = {} if device is None else {"device": device}
        with pytest.raises(ValueError, match=CPU_FP16):
            module.main(dtype="float16", **extra, **kwargs)
    with pytest.raises(ValueError, match=r"--device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
        module.main(device="gpu", **kwargs)
    if not torch.cuda.is_available():
        for dtype in ("float32", "float16"):
            with pytest.raises(ValueError, match=r"--device 'cuda:0': CUDA is not available on this machine"):
                module.main(device="cuda:0", dtype=dtype, **kwargs)
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_report_refuses_cuda_without_it_before_loading(tmp_path, monkeypatch):
    module = importlib.import_module("dyvte.cli.report")  # train/report.py, dyvte report
    monkeypatch.setattr(module, "load_model", _forbid)
    with pytest.raises(ValueError, match=r"--device 'cuda': CUDA is not available"):
        module.main(device="cuda", output_dir=str(tmp_path / "report"))
    assert not (tmp_path / "report").exists()


# ------------------------------------------- --data.* and --model.* options (the modules of dyvte.train)
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"splits": {"train_samples": 0}},
            r"train_samples \(--data.splits.train_samples\) must be an int >= 1 or null, got 0",
        ),
        (
            {"splits": {"val_samples": 0}},
            r"val_samples \(--data.splits.val_samples\) must be an int >= 1 or null, got 0",
        ),
        ({"batch_size": 0}, r"batch_size \(--data.batch_size\) must be an int >= 1"),
        ({"labels": {"batch_size": 0}}, r"batch_size \(--data.labels.batch_size\) must be an int >= 1"),
        ({"splits": {"val_fraction": 1.0}}, r"val_fraction \(--data.splits.val_fraction\) must be in \(0, 1\)"),
        ({"labels": {"agree": 1.0}}, r"agree \(--data.labels.agree\) must be in \[0, 1\)"),
        ({"labels": {"loss_ratio": 0.9}}, r"loss_ratio \(--data.labels.loss_ratio\) must be >= 1"),
        (
            {"labels": {"rule": "safe"}},
            r"--data.labels.rule: label_rule must be one of agreement, agreement-layer, kl, dyvte, dyvte-layer",
        ),
        ({"labels": {"kl_eta": 0.0}}, r"kl_eta \(--data.labels.kl_eta\) must be > 0"),
        (
            {"splits": {"calib_samples": -1}},
            r"calib_samples \(--data.splits.calib_samples\) must be null or an int >= 0, got -1",
        ),
        ({"splits": {"calib_fraction": 0.0}}, r"calib_fraction \(--data.splits.calib_fraction\) must be in \(0, 1\)"),
    ],
)
def test_label_data_arguments_are_checked_when_given(kwargs, match):
    groups = {"source": DataSource, "splits": SplitSizes, "labels": LabelOptions}
    with pytest.raises(ValueError, match=match):
        ExitLabelData(**{k: groups[k](**v) if k in groups else v for k, v in kwargs.items()})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": 1.5}, r"threshold \(--model.threshold\) must be a P\(exit\) in \[0, 1\], got 1.5"),
        ({"lr": 0.0}, r"lr \(--model.lr\) must be > 0"),
        ({"head_size": 0}, r"head_size \(--model.head_size\) must be an int >= 1 or null, got 0"),
        ({"weight_decay": -1.0}, r"weight_decay \(--model.weight_decay\) must be >= 0"),
    ],
)
def test_head_module_arguments_are_checked_before_labelling(kwargs, match):
    """`--model.threshold 1.5` failed only after labelling, when the heads were shaped."""
    from dyvte.train.module import ExitHeadsModule

    with pytest.raises(ValueError, match=match):
        ExitHeadsModule(**kwargs)


# ------------------------------------------------------------------------------------------- other launchers
@pytest.mark.parametrize("splits", ["2000/13001", "0/100", "2000", "a/b"])
def test_ablate_splits_refuses_bad_splits_before_any_labelling(splits, tmp_path):
    """A split that overlaps the scored records (15,000..19,999), is empty or does not parse is refused up front."""
    with pytest.raises(SystemExit, match="--splits"):
        load_script("train/ablate_splits.py").main(["--splits", splits, "--cache_dir", str(tmp_path / "labels")])
    assert not (tmp_path / "labels").exists()


def test_calibrate_launcher_checks_arguments_before_writing(llava, tmp_path):
    """A bad --report_thresholds fails before the model loads, and a good calibration file stays as it was."""
    model, processor, _ = llava
    _, file = saved_calibration(model, processor, tmp_path)
    before = file.read_bytes()
    script = load_script("train/calibrate.py")
    for bad in ({"report_thresholds": [1e-3, -1.0]}, {"threshold": 0.0}, {"positions": "last"}, {"dtype": "float16"}):
        with pytest.raises(ValueError, match="threshold|positions|dtype"):
            script.main(model="/nonexistent/model", output=str(tmp_path), **bad)
    assert file.read_bytes() == before


def test_every_launcher_takes_prompt_template(tmp_path):
    import inspect
    import json

    from dyvte.train.lora import AdaptModule
    from dyvte.train.options import DataSource

    model, processor = make_tiny("llava")  # saved without a chat template, as many checkpoints are
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    lines = []
    for i, rec in enumerate(records(4)):
        rec["image"].save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": rec["question"], "answer": rec["answer"]}))
    (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n")
    calibrate = load_script("train/calibrate.py").main
    kwargs = {"model": str(tmp_path / "model"), "data": str(tmp_path / "records.jsonl"), "samples": 4, "batch_size": 2}
    with pytest.raises(DataError, match=r"no chat template.*--prompt_template"):
        calibrate(**kwargs, output=str(tmp_path / "cal"))
    calibrate(**kwargs, output=str(tmp_path / "cal"), prompt_template="USER: <image>\n{question} ASSISTANT:")
    assert json.loads((tmp_path / "cal" / "calibration.json").read_text())["num_samples"] == 4
    for script in ("train/calibrate.py", "train/evaluate.py", "train/report.py"):
        assert "prompt_template" in inspect.signature(load_script(script).main).parameters, script
    for cls in (DataSource, AdaptModule):
        assert "prompt_template" in inspect.signature(cls).parameters, cls


def test_fit_with_group_by_qtype_saves_a_per_group_promise(setup_dir, caplog):
    """`--group_by qtype --margin 0.1 --tolerance 0.99`: the calibration records' types are counted before labelling,
    each certified at delta / G on its own records at 0.99 x 0.9; the saved record and promise say so."""
    cache = setup_dir / "cache-grouped"
    extra = ["--tolerance=0.99", "--margin=0.1", "--group_by=qtype", f"--data.labels.cache_dir={cache}"]
    with caplog.at_level(logging.INFO):
        summary = load_script("train/fit.py").main(fit_args(setup_dir, "heads-grouped", 1, extra))
    assert "calibration groups by qtype:" in caplog.text
    calibration = ExitHeads.from_pretrained(setup_dir / "heads-grouped").config.calibration
    sizes = calibration["group_sizes"]
    assert set(sizes) <= {"a", "b"} and sum(sizes.values()) == calibration["samples"] == 2
    assert calibration["group_by"] == "qtype" and calibration["margin"] == 0.1
    assert calibration["level"] == pytest.approx(0.1 / len(sizes))
    assert calibration["certified_at"] == pytest.approx(0.891)
    assert calibration["covers"]["groups"] == sizes and calibration["covers"]["delta"] == 0.1
    assert (
        f"in each of the {len(sizes)} groups by qtype" in calibration["promise"]
        and "margin 0.1" in (calibration["promise"])
    )
    assert summary["promise"] == calibration["promise"]


def test_fit_with_visual_inputs_trains_heads_that_run_as_they_were_trained(setup_dir):
    """`--data.labels.visual_inputs true`: the label caches keep the visual tokens' pooled states, the heads read them
    (``4d`` inputs, saved in their config) and are certified and given a score reference on them; under ``withdraw``
    each training record exits where the cached inputs say (at a raw threshold that sends rows out at different
    layers)."""
    from datasets import load_from_disk

    from dyvte.data.records import build_inputs
    from dyvte.policies.exit_heads import exit_logit, first_exit, head_inputs

    cache = setup_dir / "cache-visual"
    extra = [f"--data.labels.cache_dir={cache}", "--data.labels.visual_inputs=true"]
    summary = load_script("train/fit.py").main(fit_args(setup_dir, "heads-visual", 2, extra))
    heads = ExitHeads.from_pretrained(setup_dir / "heads-visual")
    model, processor = dyvte.data.sources.load_model(str(setup_dir / "model"))
    hidden = model.config.text_config.hidden_size
    assert heads.config.visual_inputs and heads.config.input_size == 4 * hidden
    assert heads.config.score_reference is not None and heads.config.calibration["samples"] == 2
    train = Path(summary["label_cache"]["train"])
    columns = load_from_disk(str(train)).with_format("numpy")[:]
    assert columns["visual_features"].shape == (len(columns["match"]), heads.num_heads, 2 * hidden)
    with torch.no_grad():
        logits = heads(head_inputs(columns, visual_inputs=True))  # (N, L-1)
    first = logits[:, 0].sort().values
    half = len(first) // 2
    threshold = float(torch.sigmoid((first[half - 1] + first[half]) / 2))  # head 0 fires on half of the rows
    offline = first_exit(logits, exit_logit(torch.full((heads.num_heads,), threshold))).tolist()
    assert len(set(offline)) > 1, offline  # rows leave at different layers: the comparison can fail
    indices = json.loads((train / "meta.json").read_text())["source_indices"]
    recs = list(dyvte.data.sources.load_records(str(setup_dir / "records.jsonl")).select(indices))
    with dyvte.withdraw(model, heads=heads, threshold=threshold) as handle, torch.no_grad():
        model(**build_inputs(processor, recs))
        assert handle.exit_layers.tolist() == offline
