"""Exit-head training's data and module (dyvte.train.fitting): held-out validation and calibration splits, and the
arguments of ``ExitLabelData`` and ``ExitHeadsModule`` checked when given (before any labelling). The launcher that
drives them is ``tests/train/test_fit.py``'s and ``tests/train/test_launchers.py``'s.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dyvte.train.fitting import ExitLabelData

from ..scripts import make_fit_setup


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory) -> Path:
    """A tiny 4-layer LLaVA in from_pretrained layout and 12 records in one JSONL file (no validation file)."""
    return make_fit_setup(tmp_path_factory.mktemp("fitting"))


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
