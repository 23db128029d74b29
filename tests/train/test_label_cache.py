"""dyvte.train.label_cache: a label cache's key reads the labelling model's files, so that labels of other weights
are never reused (issue 28), and its ``meta.json`` records the model's fingerprint for the heads trained on it.

Reuse and relabelling within a run are ``tests/test_clean_run.py``'s; the fit that writes the caches is
``tests/train/test_launchers.py``'s.
"""

from __future__ import annotations

import json
import os
import shutil

from dyvte.demo import demo_checkpoint_dir
from dyvte.train.label_cache import cache_path, model_files_digest
from dyvte.train.options import DataSource, LabelOptions
from dyvte.train.splits import Split

from ..tiny_models import make_tiny

PART = Split("val", "demo", "validation", 100)


def key(root, model: str, labels: LabelOptions | None = None):
    return cache_path(root, DataSource(model=model), labels or LabelOptions(), PART, 0)


def test_caches_with_visual_inputs_have_a_key_of_their_own(tmp_path):
    """A cache without the visual tokens' pooled states cannot serve heads that read them, nor the other way round;
    the plain key is the one caches had before the option existed."""
    plain = key(tmp_path, "demo")
    assert key(tmp_path, "demo", LabelOptions(visual_inputs=True)) != plain
    assert key(tmp_path, "demo", LabelOptions(visual_inputs=False)) == plain


def test_the_demo_and_its_lora_adaptation_label_into_different_caches(tmp_path):
    lora = str(demo_checkpoint_dir("demo-lora-vtw"))
    assert key(tmp_path, "demo") != key(tmp_path, lora)
    assert key(tmp_path, "demo") == key(tmp_path, "demo")  # the same model reuses its cache
    assert model_files_digest(lora).endswith("+" + model_files_digest("demo"))  # the adapter's base counts too


def test_an_adapter_on_other_base_weights_gets_another_key(tmp_path):
    """The adapter's own files are unchanged; its base's weights are replaced by others of the same size and time:
    a key made of the adapter directory's path, sizes and times would reuse the labels of the old base."""
    base = tmp_path / "base"
    make_tiny("llava")[0].save_pretrained(base)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    shutil.copy(demo_checkpoint_dir("demo-lora-vtw") / "adapter_model.safetensors", adapter)
    before = key(tmp_path, str(adapter))
    weights = base / "model.safetensors"
    stat = weights.stat()
    make_tiny("llava", seed=1)[0].save_pretrained(tmp_path / "other")  # the same shapes, other weights
    data = (tmp_path / "other" / "model.safetensors").read_bytes()
    assert len(data) == stat.st_size and data != weights.read_bytes()
    weights.write_bytes(data)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = key(tmp_path, str(adapter))
    assert after != before
    (adapter / "README.md").write_text("notes")  # not the model: the key stays
    assert key(tmp_path, str(adapter)) == after
