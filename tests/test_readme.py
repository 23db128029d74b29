"""The README's Python blocks run as written, in order, from a foreign working directory, on the demo model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not (REPO / "checkpoints" / "demo-mllm").is_dir(), reason="the demo checkpoint is not in this checkout"
)


def readme_blocks() -> list[str]:
    """Every fenced ```python block of README.md, in order."""
    text = (REPO / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_python_blocks_run_from_any_directory(tmp_path):
    blocks = readme_blocks()
    assert len(blocks) >= 4  # use, calibration, heads, pruning
    checks = textwrap.dedent(
        """
        import json as _json, torch as _torch
        _L = model.config.text_config.num_hidden_layers
        print("RESULT", _json.dumps({
            "answers": answers,
            "full_shape": list(full.shape),
            "input_shape": list(inputs["input_ids"].shape),
            "hooks_left": len(model._forward_pre_hooks) + len(model._forward_hooks),
            "cal_layer": cal.layer,
            "num_layers": _L,
            "exit_layers": h.exit_layers.tolist(),
            "calibration_saved": sorted(p.name for p in __import__("pathlib").Path("my-calibration").iterdir()),
        }))
        """
    )
    script = tmp_path / "readme_blocks.py"
    script.write_text("\n\n".join(blocks) + "\n" + checks)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}  # this checkout's dyvte, whatever is installed
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    batch, tokens = result["input_shape"]
    assert batch == 4 and len(result["answers"]) == 4
    assert result["full_shape"][:2] == [batch, tokens]  # to_input_positions restored the input length
    assert result["hooks_left"] == 0  # every handle was removed
    assert 0 <= result["cal_layer"] <= result["num_layers"]
    assert len(result["exit_layers"]) == batch
    assert all(1 <= k <= result["num_layers"] for k in result["exit_layers"])
    assert result["calibration_saved"]  # written under the working directory, not into the repository
    assert not (REPO / "my-calibration").exists()
