"""The lmms-eval install path (train/install_lmms_eval.sh): what it installs is the extra ``dyvte[lmms-eval]``,
pinned in the lock file, and no environment the project creates holds torchvision, timm or opencv."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import tomllib

from ..scripts import REPO_ROOT
from ..tools import require_module

SCRIPT = REPO_ROOT / "train" / "install_lmms_eval.sh"
#: never in an environment of the project's: on a CPU-only torch they break transformers' image processors
BANNED = {
    "torchvision",
    "timm",
    "open-clip-torch",
    "opencv-python",
    "opencv-python-headless",
    "opencv-contrib-python",
}


def _name(requirement: str) -> str:
    """A requirement's distribution name, normalized (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9_.-]+)", requirement).group(1)).lower()


def _script_list(text: str, name: str) -> list[str]:
    """The items of the bash array ``name=(...)`` in the script."""
    items = re.search(rf"^{name}=\((.*)\)$", text, re.M).group(1)
    return [d.strip('"') for d in re.findall(r'"[^"]+"|\S+', items)]


def _script_packages() -> tuple[str, list[str], list[str]]:
    """The script's lmms-eval requirement, its resolved dependencies (DEPS) and its --no-deps table stack (TABLE)."""
    text = SCRIPT.read_text()
    lmms = re.search(r'^LMMS_EVAL="([^"]+)"', text, re.M).group(1)
    return lmms, _script_list(text, "DEPS"), _script_list(text, "TABLE")


def test_the_running_environment_has_no_torchvision_timm_or_opencv():
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True
    ).stdout
    installed = {_name(p["name"]) for p in json.loads(listed)}
    assert not installed & BANNED, f"installed: {sorted(installed & BANNED)}"


def test_the_script_installs_the_extra_and_every_package_is_locked():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extra = project["optional-dependencies"]["lmms-eval"]
    lmms, deps, table = _script_packages()
    assert {_name(d) for d in deps} == {_name(e) for e in extra}  # the extra: what resolves safely
    assert not {_name(d) for d in [lmms, *deps, *table]} & BANNED
    pins = {
        _name(line): line.split("==", 1)[1]
        for line in (REPO_ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    assert pins.get("lmms-eval") == lmms.split("==", 1)[1]  # the version the script installs is the locked one
    missing = sorted({_name(d) for d in [*deps, *table]} - set(pins))
    assert not missing, f"not pinned in constraints.txt: {missing}"
    assert int(pins["filelock"].split(".")[0]) < 4  # lmms_eval.evaluator needs filelock._api
    # lmms-eval is never an ordinary dependency: its metadata would pull torchvision, timm and opencv
    everything = project["dependencies"] + [r for group in project["optional-dependencies"].values() for r in group]
    assert "lmms-eval" not in {_name(r) for r in everything}
    assert project["entry-points"]["lmms_eval.models"]["dyvte"] == "dyvte.integrations.lmms_entry:manifest"


def test_lmms_eval_imports_without_torchvision_timm_or_opencv():
    """What the plugin needs from lmms-eval, imported in a fresh interpreter: none of the banned modules load."""
    require_module("lmms_eval", install="bash train/install_lmms_eval.sh")
    code = (
        "import sys, lmms_eval, lmms_eval.api.model, lmms_eval.evaluator, lmms_eval.models\n"
        "import dyvte.integrations.lmms_eval\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'torchvision', 'timm', 'cv2', 'decord'}))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert run.stdout.strip().splitlines()[-1] == "[]"
