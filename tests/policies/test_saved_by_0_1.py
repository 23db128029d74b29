"""Files written by dyvte 0.1 load in 0.2: exit heads (config + safetensors) and a KL calibration.

The JSON texts below are byte-for-byte the shape 0.1 wrote (the committed ``checkpoints/demo-exit-heads`` and
``checkpoints/demo-calibration`` were written by 0.1 too, but may be rewritten by a later version; these stay).
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

import dyvte

from ..tiny_models import make_batch, make_tiny

HEADS_CONFIG_0_1 = """{
  "model_type": "llava",
  "hidden_size": 64,
  "num_layers": 4,
  "head_size": 128,
  "threshold": 0.5,
  "format_version": 1,
  "thresholds": [0.9, 0.6, 0.999],
  "calibration": {"parameter": 0.07, "tolerance": 0.01, "delta": 0.1, "samples": 13000, "errors": 115,
    "exit_rate": 0.73, "p_value": 0.098, "tested": 173, "family": "savings", "label_rule": "agreement",
    "source": {"held_out": false, "train": "demo [train]", "val": "demo [validation]",
      "calib": "demo [validation] records 2000..14999"}, "savings": [0.6, 0.4, 0.2]},
  "label_rule": "agreement",
  "extra_inputs": null,
  "threshold_logits": [2.1972245773362196, 0.4054651081081645, 6.906754778648465]
}
"""

CALIBRATION_0_1 = """{
  "layer": 2,
  "kl_per_layer": [7.5, 0.25, 0.002, 0.001, 0.0],
  "threshold": 0.003,
  "num_samples": 100,
  "positions": "first",
  "model_type": "llava",
  "num_layers": 4,
  "met": true
}
"""


def _write_heads_0_1(directory) -> dict[str, torch.Tensor]:
    """0.1's exit-heads directory: its config text and a safetensors file with 0.1's keys and metadata."""
    directory.mkdir()
    (directory / "exit_heads_config.json").write_text(HEADS_CONFIG_0_1)
    torch.manual_seed(0)
    width, hidden = 2 * 64, 128
    state = {}
    for j in range(3):  # L - 1 heads: LayerNorm(2d) -> Linear(2d, h) -> GELU -> Linear(h, 1)
        state[f"heads.{j}.0.weight"], state[f"heads.{j}.0.bias"] = torch.rand(width), torch.randn(width)
        state[f"heads.{j}.1.weight"], state[f"heads.{j}.1.bias"] = torch.randn(hidden, width), torch.randn(hidden)
        state[f"heads.{j}.3.weight"], state[f"heads.{j}.3.bias"] = torch.randn(1, hidden), torch.randn(1)
    save_file(state, str(directory / "exit_heads.safetensors"), metadata={"format": "pt", "dyvte": "exit_heads"})
    return state


def test_exit_heads_saved_by_0_1_load_and_run(tmp_path):
    state = _write_heads_0_1(tmp_path / "heads")
    heads = dyvte.ExitHeads.from_pretrained(tmp_path / "heads")
    assert heads.config.thresholds == [0.9, 0.6, 0.999] and heads.config.calibration["errors"] == 115
    loaded = heads.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    saved_logits = json.loads(HEADS_CONFIG_0_1)["threshold_logits"]
    assert heads.exit_logits().tolist() == torch.tensor(saved_logits, dtype=torch.float32).tolist()

    model, processor = make_tiny("llava")
    inputs = make_batch(processor, "llava", [[(8, 8)], [(8, 8)]], seed=0)
    with dyvte.withdraw(model, heads=heads) as handle, torch.no_grad():
        model(**inputs)
    assert handle.exit_layers.shape == (2,) and all(1 <= k <= 4 for k in handle.exit_layers.tolist())


def test_calibration_saved_by_0_1_loads_and_withdraws_at_its_layer(tmp_path):
    (tmp_path / "calibration.json").write_text(CALIBRATION_0_1)
    calibration = dyvte.Calibration.load(tmp_path)
    assert (calibration.layer, calibration.threshold, calibration.met) == (2, 0.003, True)
    model, _ = make_tiny("llava")
    with dyvte.withdraw(model, calibration=tmp_path) as handle:
        assert handle.layer == 2
