"""Held-out records that are not held out (dyvte.train.splits, train/fit.py): validation and calibration records that
are copies of training records are counted by record digest, warned about and refused above 5% before labelling
(unless ``--allow_overlap true``); the log no longer calls such splits disjoint; and a label cache is not reused
after its images changed under their old names.

Cases (docs/robustness.md, "Exit heads and calibration"): ``--data.source.val_data`` a copy of the training file,
a records file with every record twice, images replaced under the same names, a ``save_to_disk`` source whose
digests are kept between runs.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

import dyvte.data.sources
from dyvte.train.certify import check_split_overlap
from dyvte.train.label_data import ExitLabelData
from dyvte.train.options import DataSource, LabelOptions, SplitSizes
from dyvte.train.splits import SplitPlan

from ..scripts import fit_args, load_script, make_fit_setup
from ..tiny_models import make_image, records


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory) -> Path:
    """A tiny LLaVA and 12 records in one JSONL file, with a copy of that file and one holding every record twice."""
    root = make_fit_setup(tmp_path_factory.mktemp("splits"))
    lines = (root / "records.jsonl").read_text().splitlines()
    shutil.copy(root / "records.jsonl", root / "copy.jsonl")
    (root / "twice.jsonl").write_text("\n".join(lines + lines) + "\n")
    return root


def _forbid(*_args, **_kwargs):
    raise AssertionError("work started: the bad input should have been refused before it")


def _counts(data: ExitLabelData) -> dict[tuple[str, str], int]:
    return {(o.records, o.among): o.count for o in data.plan.overlaps()}


def test_a_validation_file_that_copies_the_training_file_is_refused_before_labelling(setup_dir, monkeypatch):
    monkeypatch.setattr(dyvte.data.sources, "load_model", _forbid)
    source = DataSource(model=str(setup_dir / "model"), data=str(setup_dir / "records.jsonl"))
    copy = ExitLabelData(
        DataSource(**{**vars(source), "val_data": str(setup_dir / "copy.jsonl")}),
        SplitSizes(train_samples=8, val_samples=4),
    )
    # training: records 0..7; validation: the copy's 0..3 (all in training); calibration: the copy's 4..11
    assert _counts(copy) == {
        ("validation records", "training records"): 4,
        ("calibration records", "training records"): 4,
        ("calibration records", "validation records"): 0,
    }
    cache = setup_dir / "cache-copy"
    args = fit_args(setup_dir, "heads-copy", 1, [f"--data.source.val_data={setup_dir / 'copy.jsonl'}"])
    args.append(f"--data.labels.cache_dir={cache}")
    with pytest.raises(ValueError) as refused:
        load_script("train/fit.py").main(args)
    message = str(refused.value)
    assert "4 of the 4 validation records (100.0%) are copies of training records" in message
    assert "4 of the 8 calibration records (50.0%) are copies of training records" in message
    assert "--allow_overlap true" in message and message.endswith("Nothing was labelled.")
    assert not (setup_dir / "heads-copy").exists() and not cache.exists()


def test_duplicated_records_are_not_called_disjoint(setup_dir, monkeypatch, caplog):
    """Every record twice: held out at random, most held-out records have their twin in training."""
    monkeypatch.setattr(dyvte.data.sources, "load_model", _forbid)
    data = ExitLabelData(DataSource(data=str(setup_dir / "twice.jsonl")), SplitSizes(val_samples=4))
    with caplog.at_level(logging.INFO):
        counts = _counts(data)
    assert "disjoint" not in caplog.text
    assert "validation: 4 records and calibration: 5 records held out at random (seed 0)" in caplog.text
    indices = data.split_indices()
    twins = {name: sum((i + 12) % 24 in set(indices["train"]) for i in indices[name]) for name in ("val", "calib")}
    assert counts[("validation records", "training records")] == twins["val"] > 0
    assert counts[("calibration records", "training records")] == twins["calib"]
    with pytest.raises(ValueError, match=r"validation records .* are copies of training records.*--allow_overlap"):
        check_split_overlap(data, allow=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_split_overlap(data, allow=True)  # --allow_overlap true: warned, with the counts
    assert f"{twins['val']} of the 4 validation records" in caplog.text and "(--allow_overlap true)" in caplog.text


def test_distinct_records_pass_and_the_log_says_they_were_compared(setup_dir, caplog):
    data = ExitLabelData(DataSource(data=str(setup_dir / "records.jsonl")), SplitSizes(val_samples=4))
    with caplog.at_level(logging.INFO):
        check_split_overlap(data, allow=False)
    assert set(_counts(data).values()) == {0}
    assert "none of the validation or calibration records is a copy of a training record" in caplog.text


def test_images_changed_under_their_names_give_a_new_label_cache(tmp_path):
    """The old key held the records file's size and time only: new pictures behind old names reused stale labels."""
    for i, rec in enumerate(records(12)):
        rec["image"].save(tmp_path / f"img{i}.png")
    lines = [
        json.dumps({"image": f"img{i}.png", "question": r["question"], "answer": r["answer"]})
        for i, r in enumerate(records(12))
    ]
    (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "model").mkdir()  # the cache key reads the model folder's files (none here: no model is loaded)
    source = DataSource(model=str(tmp_path / "model"), data=str(tmp_path / "records.jsonl"))
    sizes, labels = SplitSizes(val_samples=4), LabelOptions(cache_dir=str(tmp_path / "cache"))
    before = ExitLabelData(source, sizes, labels).cache_paths()
    assert ExitLabelData(source, sizes, labels).cache_paths() == before  # nothing changed: the same caches
    data = ExitLabelData(source, sizes, labels)
    holder = next(name for name, indices in data.split_indices().items() if 0 in indices)
    make_image(32, 32, np.random.default_rng(7)).save(tmp_path / "img0.png")  # same name, new picture
    after = data.cache_paths()
    assert after[holder] != before[holder]
    assert {name: path for name, path in after.items() if name != holder} == {
        name: path for name, path in before.items() if name != holder
    }


def test_digests_of_a_source_that_holds_its_images_are_kept_between_runs(tmp_path, monkeypatch):
    """A save_to_disk source (images inside its Arrow files): a run whose label caches exist reads no record; a
    rewritten source is hashed again."""
    import datasets

    def save(seed: int) -> None:
        recs = [{k: r[k] for k in ("image", "question", "answer")} for r in records(10, seed=seed)]
        features = datasets.Features(
            {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}
        )
        splits = {"train": recs[:6], "validation": recs[6:]}
        data = datasets.DatasetDict({k: datasets.Dataset.from_list(v, features=features) for k, v in splits.items()})
        shutil.rmtree(tmp_path / "data", ignore_errors=True)
        data.save_to_disk(str(tmp_path / "data"))

    save(0)
    (tmp_path / "model").mkdir()  # the cache key reads the model folder's files (none here: no model is loaded)
    source = DataSource(model=str(tmp_path / "model"), data=str(tmp_path / "data"))
    sizes, labels = SplitSizes(val_samples=2), LabelOptions(cache_dir=str(tmp_path / "cache"))
    first = ExitLabelData(source, sizes, labels).cache_paths()
    kept = sorted(p.name for p in (tmp_path / "cache" / "record-digests").iterdir())
    assert len(kept) == 3  # train, validation, calibration
    with monkeypatch.context() as patch:
        patch.setattr(SplitPlan, "load", _forbid)
        assert ExitLabelData(source, sizes, labels).cache_paths() == first
    save(1)  # new records under the same folder: new stamps, new digests, new caches
    second = ExitLabelData(source, sizes, labels).cache_paths()
    assert all(second[name] != first[name] for name in first)
