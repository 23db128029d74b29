"""The Python blocks of README.md and docs/guide.md run as written, in order, from a foreign working directory.

Each file's blocks are self-contained (the guide repeats the README's set-up in its first block) and run in a fresh
process on the demo model; checks appended after the last block assert what the blocks computed.
"""

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


def python_blocks(name: str) -> list[str]:
    """Every fenced ```python block of the repository's file ``name``, in order."""
    text = (REPO / name).read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def run_blocks(blocks: list[str], checks: str, cwd: Path) -> dict:
    """Run ``blocks`` and then ``checks`` (which prints ``RESULT <json>``) in one fresh process from ``cwd``."""
    script = cwd / "blocks.py"
    script.write_text("\n\n".join(blocks) + "\n" + textwrap.dedent(checks))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}  # this checkout's dyvte, whatever is installed
    done = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULT ", 1)[1])


def test_readme_python_blocks_run_from_any_directory(tmp_path):
    blocks = python_blocks("README.md")
    assert len(blocks) == 2  # use, exit heads
    result = run_blocks(
        blocks,
        """
        import json as _json
        print("RESULT", _json.dumps({
            "answers": answers,
            "input_shape": list(inputs["input_ids"].shape),
            "out_shape": list(out.shape),
            "hooks_left": len(model._forward_pre_hooks) + len(model._forward_hooks),
            "num_layers": model.config.text_config.num_hidden_layers,
            "exit_layers": h.exit_layers.tolist(),
            "promise": heads.config.calibration,
        }))
        """,
        tmp_path,
    )
    batch, tokens = result["input_shape"]
    assert batch == 4 and len(result["answers"]) == 4 and all(isinstance(a, str) for a in result["answers"])
    assert result["out_shape"][0] == batch and result["out_shape"][1] > tokens  # the heads' generate ran
    assert result["hooks_left"] == 0  # every handle was removed
    assert len(result["exit_layers"]) == batch
    assert all(1 <= k <= result["num_layers"] for k in result["exit_layers"])
    assert result["promise"]["tolerance"] == 0.01  # the committed heads' certified promise
    assert list(tmp_path.iterdir()) == [tmp_path / "blocks.py"]  # nothing written to the working directory


def test_guide_python_blocks_run_from_any_directory(tmp_path):
    blocks = python_blocks("docs/guide.md")
    assert len(blocks) >= 8  # use, calibration, heads, your model, pruning, serving, evaluation, extending
    result = run_blocks(
        blocks,
        """
        import json as _json, pathlib as _pathlib
        print("RESULT", _json.dumps({
            "answers": answers,
            "per_row": per_row.exit_layers.tolist(),
            "full_shape": list(full.shape),
            "input_shape": list(inputs["input_ids"].shape),
            "hooks_left": len(model._forward_pre_hooks) + len(model._forward_hooks),
            "cal_layer": cal.layer,
            "num_layers": num_layers,
            "exit_layers": h.exit_layers.tolist(),
            "raw_exit_layers": raw.exit_layers.tolist(),
            "calibration_saved": sorted(p.name for p in _pathlib.Path("my-calibration").iterdir()),
            "my_out_rows": my_out.shape[0],
            "my_hooks_left": len(my_model._forward_pre_hooks) + len(my_model._forward_hooks),
            "sync_calls": counter.calls,
            "reference": [reference.method, reference.accuracy, reference.flops],
            "static6": [static6.method, static6.flops, static6.metrics["all"]["agreement"]],
            "methods": [r.method for r in results],
            "flops_ratio": flops.ratio,
            "halfway": halfway.exit_layers.tolist(),
            "at_fraction": [[r.method, r.exit_layers] for r in at_fraction],
            "first_kept": first.fed_visual.tolist(),
            "first_plus": [first_plus.method, first_plus.flops],
        }))
        """,
        tmp_path,
    )
    batch, tokens = result["input_shape"]
    num_layers = result["num_layers"]
    assert batch == 4 and len(result["answers"]) == 4
    assert result["per_row"] == [2, 5, 6, 8]
    assert result["full_shape"][:2] == [batch, tokens]  # to_input_positions restored the input length
    assert result["hooks_left"] == 0 and result["my_hooks_left"] == 0  # every handle was removed
    assert 0 <= result["cal_layer"] <= num_layers
    assert result["calibration_saved"] == ["calibration.json"]  # under the working directory, not the repository
    assert not (REPO / "my-calibration").exists()
    assert len(result["exit_layers"]) == len(result["raw_exit_layers"]) == batch
    assert all(1 <= k <= num_layers for k in result["exit_layers"] + result["raw_exit_layers"])
    assert result["my_out_rows"] == 2
    calls = result["sync_calls"]  # per model call of generate: the prefill, then the decode steps
    assert len(calls) >= 2 and calls[0] == 1 and not any(calls[1:])  # one read in the prefill, none per step
    assert result["reference"][0] == "full" and result["reference"][2] == 1.0
    assert result["static6"][0] == "static K=6" and 0 < result["static6"][1] < 1 and 0 <= result["static6"][2] <= 1
    assert result["methods"] == ["fastv K=2 R=0.75", "static K=5", "static K=7"]
    assert 0 < result["flops_ratio"] < 1
    assert result["halfway"] == [num_layers // 2] * batch
    assert result["at_fraction"] == [
        ["fraction 0.5", [num_layers // 2] * 8],
        ["fraction 0.75", [round(0.75 * num_layers)] * 8],
    ]  # the registered syntax parsed the strings and named the rows
    assert result["first_kept"] == [9] * batch  # 9 of each image's 36 patches reached the LLM
    assert result["first_plus"][0] == "first R=0.5 + fraction 0.75" and 0 < result["first_plus"][1] < 1
