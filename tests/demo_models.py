"""The demo and the LoRA-merged demo (``checkpoints/demo-lora-vtw`` merged into ``checkpoints/demo-mllm``): two models
of the same type, width and depth whose weights differ, for the checks that tie heads and calibrations to their model.

Test-support module (not a test file). Needs peft (the ``train`` extra).
"""

from __future__ import annotations

import logging

from dyvte.data.sources import load_model
from dyvte.demo import demo_checkpoint_dir

from .scripts import REPO_ROOT

DEMO_HEADS = REPO_ROOT / "checkpoints" / "demo-exit-heads"
DEMO_CALIBRATION = REPO_ROOT / "checkpoints" / "demo-calibration"


def demo_and_merged():
    """``(demo, lora_merged_demo, processor)``, each in eval mode (the adapter shares the demo's processor)."""
    demo, processor = load_model("demo")
    adapted, _ = load_model(str(demo_checkpoint_dir("demo-lora-vtw")))
    return demo, adapted.merge_and_unload().eval(), processor


def fingerprint_warnings(caplog) -> list[logging.LogRecord]:
    """The records the model checks logged (other loggers, such as calibrate's, are left out)."""
    return [r for r in caplog.records if r.name == "dyvte.engine.fingerprint"]
