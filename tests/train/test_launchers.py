"""Bad inputs to the launchers (fit, adapt, evaluate), to method strings, labelling and evaluation: each is refused
with a message that names it, before any work, or handled correctly, never a silent wrong answer.

Cases (docs/robustness.md): untrained weights saved as trained (fit / adapt with no optimizer step), validation on
the training records, evaluation and labelling of a model in training mode, malformed or out-of-range method
strings, evaluate's late failures (every method checked before the first forward), and half-written files.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import dyvte
import dyvte.data.sources
from dyvte.data.records import build_inputs
from dyvte.eval.harness import EvalResult
from dyvte.eval.methods import parse_method
from dyvte.exits.labels import build_label_cache, on_the_fly_labels
from dyvte.policies.exit_heads import CONFIG_NAME, NEVER, WEIGHTS_NAME, ExitHeads, ExitHeadsConfig
from dyvte.train.fitting import ExitLabelData

from .scripts import load_script
from .test_calibrate_evaluate import TEMPLATE, records
from .test_fit import fit_args, make_fit_setup
from .tiny_models import make_tiny

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_HEADS = REPO_ROOT / "checkpoints" / "demo-exit-heads"  # made for the 8-layer demo model
DEMO_CALIBRATION = REPO_ROOT / "checkpoints" / "demo-calibration"


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory) -> Path:
    """A tiny 4-layer LLaVA in from_pretrained layout and 12 records in one JSONL file (no validation file)."""
    return make_fit_setup(tmp_path_factory.mktemp("bad-launchers"))


def _forbid(*_args, **_kwargs):
    raise AssertionError("work started: the bad input should have been refused before it")


def _flags(model: torch.nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


# ------------------------------------------------------------------------------ case 1: weights that never trained
@pytest.mark.parametrize(
    "option", ["--trainer.max_epochs=0", "--trainer.max_steps=0", "--trainer.limit_train_batches=0"]
)
def test_fit_refuses_a_run_without_training_steps_before_labelling(setup_dir, option, monkeypatch):
    """`fit.py --trainer.max_epochs 0` saved untrained heads (`steps: 0`); now refused before any labelling."""
    monkeypatch.setattr(dyvte.data.sources, "load_model", _forbid)  # labelling would load the MLLM first
    name = option.split(".")[1].split("=")[0]
    args = fit_args(setup_dir, f"heads-{name}", 1, [option, f"--data.cache_dir={setup_dir / f'cache-{name}'}"])
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


def test_fit_refuses_a_missing_resume_checkpoint(setup_dir, monkeypatch):
    monkeypatch.setattr(dyvte.data.sources, "load_model", _forbid)
    args = fit_args(setup_dir, "heads-resume", 1, [f"--ckpt_path={setup_dir / 'no.ckpt'}"])
    with pytest.raises(ValueError, match=r"--ckpt_path .*no\.ckpt: no such checkpoint file"):
        load_script("train/fit.py").main(args)


# -------------------------------------------------------------------- case 3: validation on the training records
def test_held_out_split_is_disjoint_and_seeded():
    from dyvte.train.fitting import held_out_split

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
    data = ExitLabelData(model=str(setup_dir / "model"), data=jsonl, train_samples=8, val_samples=4)
    parts = data.split_indices()  # calibration: calib_fraction (0.2) of 12 = 2 more records held out
    assert parts["val"] is not None and [len(parts[k]) for k in ("train", "val", "calib")] == [6, 4, 2]
    train, val, calib = (set(parts[k]) for k in ("train", "val", "calib"))
    assert not train & val and not calib & (train | val)
    again = ExitLabelData(model=str(setup_dir / "model"), data=jsonl, train_samples=8, val_samples=4)
    assert again.split_indices() == parts
    other = ExitLabelData(model=str(setup_dir / "model"), data=jsonl, train_samples=8, val_samples=4, split_seed=3)
    assert other.split_indices()["val"] != parts["val"]
    other = str(setup_dir / "other.jsonl")
    separate = ExitLabelData(model=str(setup_dir / "model"), data=jsonl, val_data=other, calib_samples=0)
    assert separate.split_indices() == {"train": None, "val": None}  # a separate validation file: nothing carved
    demo = ExitLabelData(data="demo")  # distinct named splits: calibration = validation records 2000..14999
    assert demo.split_indices() == {"train": None, "val": None, "calib": None}
    assert demo.split_summary()["calib"] == "demo [validation] records 2000..14999"
    fraction = ExitLabelData(model=str(setup_dir / "model"), data=jsonl, train_samples=None, val_samples=None)
    assert [len(v) for v in fraction.split_indices().values()] == [9, 1, 2]  # 10% of 12 (at least 1), 20% of 12
    none = ExitLabelData(model=str(setup_dir / "model"), data=jsonl, val_samples=4, calib_samples=0)
    assert [len(v) for v in none.split_indices().values()] == [8, 4]  # --data.calib_samples 0: no calibration
    with pytest.raises(ValueError, match=r"--data\.calib_samples=9: calibration takes the records of .* none is left"):
        ExitLabelData(data="demo", val_samples=15000, calib_samples=9).split_indices()
    with pytest.raises(ValueError, match=r"--data\.val_samples=12 .*held out of the 12 records"):
        ExitLabelData(model=str(setup_dir / "model"), data=jsonl, val_samples=12).split_indices()


def test_fit_without_val_data_validates_on_held_out_records(setup_dir, caplog):
    """`fit.py --data.data file.jsonl` validated on its own training records; now on a disjoint held-out split."""
    cache = setup_dir / "cache-heldout"
    args = fit_args(setup_dir, "heads-heldout", 1, [f"--data.cache_dir={cache}"])
    with caplog.at_level(logging.INFO, logger="dyvte.train.fitting"):
        summary = load_script("train/fit.py").main(args)
    assert "validation: 4 records and calibration: 2 records held out at random (seed 0) from the 12 records of" in (
        caplog.text
    )
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
    # 2 calibration records cannot certify 1% disagreement: the heads never fire, and the log says why
    assert written["calibration"]["parameter"] is None and written["calibration"]["samples"] == 2
    assert written["thresholds"] == [NEVER] * 3
    assert "calibration: no threshold keeps at most 0.01 disagreement with probability >= 0.9 on 2 samples" in (
        caplog.text
    )
    from datasets import load_from_disk

    caches = {k: load_from_disk(v).with_format("torch")[:] for k, v in written["label_cache"].items()}
    train, val, calib = (caches[k]["features"] for k in ("train", "val", "calib"))
    assert len(train) == 6 and len(val) == 4 and len(calib) == 2
    for row in [*val, *calib]:  # no held-out sample is a training sample (identical features would say it is)
        assert not any(torch.equal(row, t) for t in train)
    meta = {k: json.loads((Path(v) / "meta.json").read_text()) for k, v in written["label_cache"].items()}
    held = [set(meta[k]["source_indices"]) for k in ("train", "val", "calib")]
    assert not held[0] & held[1] and not held[0] & held[2] and not held[1] & held[2]


# ------------------------------------------------------------------------ case 5: a model in training mode
@pytest.fixture
def dropout_model():
    """A tiny LLaVA whose attention has real dropout (0.5), returned in eval mode."""
    model, processor = make_tiny("llava")
    processor.chat_template = TEMPLATE
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
        if isinstance(getattr(module, "dropout", None), float):  # CLIP's attention keeps its rate as `dropout`
            module.dropout = 0.5
    return model, processor


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


def test_labels_of_a_model_in_training_mode_are_the_eval_mode_labels(dropout_model, caplog):
    model, processor = dropout_model
    recs = records(4)
    inputs = build_inputs(processor, recs, with_answers=True)
    reference = build_label_cache(model, processor, recs, batch_size=2, progress=False).with_format("torch")[:]
    fly_reference = on_the_fly_labels(model, inputs, 2)
    model.train()
    flags = _flags(model)
    with caplog.at_level(logging.WARNING, logger="dyvte.utils.modes"):
        got = build_label_cache(model, processor, recs, batch_size=2, progress=False).with_format("torch")[:]
        fly = on_the_fly_labels(model, inputs, 2)
    assert "build_label_cache (labelling): the model was in training mode" in caplog.text
    assert "on_the_fly_labels (labelling): the model was in training mode" in caplog.text
    assert torch.allclose(got["features"], reference["features"], atol=1e-6)
    for column in ("match", "correct", "dyvte"):
        assert torch.equal(got[column], reference[column]), column
    assert torch.allclose(got["kl"], reference["kl"], atol=1e-6)
    assert torch.allclose(fly[0], fly_reference[0], atol=1e-6) and torch.equal(fly[1], fly_reference[1])
    assert _flags(model) == flags


# ---------------------------------------------------------------------------------- case 13: method strings
BAD_METHODS = [
    "static:abc",
    "static:",
    "static:1,,2",
    "static:9",
    "static:-1",
    "static:1.5",
    "full:1",
    "fastervlm:abc",
    "fastervlm:1",
    "fastervlm:-0.5",
    "fastervlm:nan",
    "random:",
    "fastv:2",
    "fastv:x:0.5",
    "fastv:0:0.5",
    "fastv:9:0.5",
    "fastv:2:1.5",
    "calibrated:",
    "calibrated:/no/such/dir",
    f"heads:{DEMO_HEADS}:abc",
    f"heads:{DEMO_HEADS}:0",
    f"heads:{DEMO_HEADS}:1.5",
    f"heads:{DEMO_HEADS}:",
    f"heads:{DEMO_HEADS}:0.5:0.7",
    "heads:",
    "heads:/no/such/dir:0.5",
    "bogus:1",
    "",
    "static:1+fastervlm:0.5",
    "full+static:1",
    "fastervlm:0.5+static:1+static:2",
]


@pytest.mark.parametrize("spec", BAD_METHODS)
def test_malformed_method_strings_are_named_with_their_form(spec):
    """`static:abc` / `heads:DIR:abc` gave bare int() / float() errors, `static:9` on 8 layers passed."""
    with pytest.raises(ValueError, match=re.escape(f"method {spec!r}: ") + r".*; expected "):
        parse_method(spec, 8)


def test_well_formed_method_strings_still_parse():
    assert [m.name for m in parse_method("static:0,8", 8)] == ["static K=0", "static K=8"]
    assert len(parse_method(" static:all ", 8)) == 9
    heads = parse_method(f"heads:{DEMO_HEADS}:0.5,1", 8)
    assert [m.options["threshold"] for m in heads] == [0.5, 1.0]
    assert parse_method(f"heads:{DEMO_HEADS}", 8)[0].options["threshold"] is None
    assert [m.name for m in parse_method("fastv:8:0,0.5", 8)] == ["fastv K=8 R=0", "fastv K=8 R=0.5"]
    assert len(parse_method(f"random:0.5+heads:{DEMO_HEADS}:0.5", 8)) == 1


def test_an_inconsistent_calibration_is_named_with_its_method_string(tmp_path):
    data = json.loads((DEMO_CALIBRATION / "calibration.json").read_text())
    data["layer"] = (data["layer"] + 1) % (data["num_layers"] + 1)
    (tmp_path / "calibration.json").write_text(json.dumps(data))
    spec = f"calibrated:{tmp_path}"
    with pytest.raises(ValueError, match=re.escape(f"method {spec!r}: cannot load the calibration") + ".*consistent"):
        parse_method(spec, 8)


@pytest.mark.parametrize("spec", [f"heads:{DEMO_HEADS}:0.5", f"calibrated:{DEMO_CALIBRATION}"])
def test_directories_for_another_model_are_named_before_running(spec):
    from dyvte.eval.methods import check_method

    model, _ = make_tiny("llava")  # 4 layers; the demo heads and calibration were made for 8
    hooks = len(model._forward_pre_hooks)
    for method in parse_method(spec, 4):
        with pytest.raises(ValueError, match=re.escape(f"method {spec!r} (") + r".*cannot run on this model"):
            check_method(method, model, spec)
    assert len(model._forward_pre_hooks) == hooks  # nothing left on the model


# -------------------------------------------------------------------- evaluate: everything checked before work
def _counting_loader(monkeypatch, script, forwards: list[int]) -> None:
    """Make ``script.load_model`` count every forward of the model it loads."""
    real = script.load_model

    def load(*args, **kwargs):
        model, processor = real(*args, **kwargs)
        model.register_forward_pre_hook(lambda *_: forwards.append(1))
        return model, processor

    monkeypatch.setattr(script, "load_model", load)


def test_evaluate_checks_every_method_before_the_full_model_runs(tmp_path, monkeypatch):
    """The issue's call: `'["static:0,1","static:9"]'` on the 8-layer demo ran full, K = 0, K = 1, then crashed."""
    script = load_script("train/eval.py")
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
    script = load_script("train/eval.py")
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
    names = [m.name for m in load_script("train/eval.py").resolve_methods(specs, model, 4)]
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
    script = load_script("train/eval.py")
    monkeypatch.setattr(script, "load_model", _forbid)
    (tmp_path / "a-file").write_text("keep me\n")
    if option == "output_dir":
        value = str(tmp_path / value)
    kwargs = {"output_dir": str(tmp_path / "eval"), option: value}
    with pytest.raises(ValueError, match=match):
        script.main(**kwargs)
    assert not (tmp_path / "eval").exists() and (tmp_path / "a-file").read_text() == "keep me\n"


# ------------------------------------------------------------------------------------------- atomic writes
def _heads(seed: int) -> ExitHeads:
    torch.manual_seed(seed)
    return ExitHeads(ExitHeadsConfig("llava", 16, 3, threshold=0.5 if seed == 0 else 0.7))


def _same_weights(a: ExitHeads, b: ExitHeads) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def _half_write(self: Path, text: str, *args, **kwargs) -> int:
    with open(self, "w") as handle:
        handle.write(text[: len(text) // 2])
    raise OSError("disk full (simulated)")


def test_a_heads_save_that_fails_midway_leaves_the_old_heads(tmp_path, monkeypatch):
    old, new = _heads(0), _heads(1)
    old.save_pretrained(tmp_path)
    assert not _same_weights(old, new)

    def broken_save_file(state, filename, metadata=None):  # the weights file is cut short, then the save fails
        Path(filename).write_bytes(b"\0" * 10)
        raise OSError("disk full (simulated)")

    with monkeypatch.context() as mp:
        mp.setattr(dyvte.policies.exit_heads, "save_file", broken_save_file)
        with pytest.raises(OSError, match="simulated"):
            new.save_pretrained(tmp_path)
    loaded = ExitHeads.from_pretrained(tmp_path)
    assert _same_weights(loaded, old) and loaded.config == old.config
    with monkeypatch.context() as mp:  # the weights are written, the config is cut short: neither file is replaced
        mp.setattr(Path, "write_text", _half_write)
        with pytest.raises(OSError, match="simulated"):
            new.save_pretrained(tmp_path)
    loaded = ExitHeads.from_pretrained(tmp_path)
    assert _same_weights(loaded, old) and loaded.config == old.config
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_NAME, CONFIG_NAME]  # no temporary file left
    new.save_pretrained(tmp_path)
    assert _same_weights(ExitHeads.from_pretrained(tmp_path), new)


def test_heads_saved_into_an_existing_file_name_it(tmp_path):
    (tmp_path / "heads").write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="is an existing file"):
        _heads(0).save_pretrained(tmp_path / "heads")


def test_a_result_save_that_fails_midway_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "full.json"
    old = EvalResult("full", {"all": {"accuracy": 0.95}}, ["1"], [4], [1.0], ["a"])
    old.save(path)
    before = path.read_text()
    monkeypatch.setattr(Path, "write_text", _half_write)
    with pytest.raises(OSError, match="simulated"):
        EvalResult("full", {"all": {"accuracy": 0.5}}, ["2"], [4], [1.0], ["a"]).save(path)
    monkeypatch.undo()
    assert path.read_text() == before and EvalResult.load(path) == old
    assert [p.name for p in tmp_path.iterdir()] == ["full.json"]


# ------------------------------------------------------------------------------ data module arguments
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_samples": 0}, r"train_samples \(--data.train_samples\) must be an int >= 1 or null, got 0"),
        ({"val_samples": 0}, r"val_samples \(--data.val_samples\) must be an int >= 1 or null, got 0"),
        ({"batch_size": 0}, r"batch_size \(--data.batch_size\) must be an int >= 1"),
        ({"label_batch_size": 0}, r"label_batch_size \(--data.label_batch_size\) must be an int >= 1"),
        ({"val_fraction": 1.0}, r"val_fraction \(--data.val_fraction\) must be in \(0, 1\)"),
        ({"agree": 1.0}, r"agree \(--data.agree\) must be in \[0, 1\)"),
        ({"loss_ratio": 0.9}, r"loss_ratio \(--data.loss_ratio\) must be >= 1"),
        ({"label_rule": "safe"}, r"--data.label_rule: label_rule must be one of agreement, kl, dyvte, dyvte-layer"),
        ({"kl_eta": 0.0}, r"kl_eta \(--data.kl_eta\) must be > 0"),
        ({"calib_samples": -1}, r"calib_samples \(--data.calib_samples\) must be null or an int >= 0, got -1"),
        ({"calib_fraction": 0.0}, r"calib_fraction \(--data.calib_fraction\) must be in \(0, 1\)"),
    ],
)
def test_label_data_arguments_are_checked_when_given(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExitLabelData(**kwargs)


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
    from dyvte.train.fitting import ExitHeadsModule

    with pytest.raises(ValueError, match=match):
        ExitHeadsModule(**kwargs)


@pytest.mark.parametrize("splits", ["2000/13001", "0/100", "2000", "a/b"])
def test_ablate_splits_refuses_bad_splits_before_any_labelling(splits, tmp_path):
    """A split that overlaps the scored records (15,000..19,999), is empty or does not parse is refused up front."""
    with pytest.raises(SystemExit, match="--splits"):
        load_script("train/ablate_splits.py").main(["--splits", splits, "--cache_dir", str(tmp_path / "labels")])
    assert not (tmp_path / "labels").exists()


def test_calibrate_launcher_checks_arguments_before_writing(llava, tmp_path):
    """A bad --report_thresholds fails before the model loads, and a good calibration file stays as it was."""
    model, processor, _ = llava
    _, file = _saved_calibration(model, processor, tmp_path)
    before = file.read_bytes()
    script = load_script("train/calibrate.py")
    for bad in ({"report_thresholds": [1e-3, -1.0]}, {"threshold": 0.0}, {"positions": "last"}, {"dtype": "float16"}):
        with pytest.raises(ValueError, match="threshold|positions|dtype"):
            script.main(model="/nonexistent/model", output=str(tmp_path), **bad)
    assert file.read_bytes() == before
