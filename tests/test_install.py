"""An editable install that a clone's folder cannot shadow (docs/design.md §6, "An editable install a clone's
folder cannot shadow").

A clone of the repository in a folder named ``dyvte`` holds no ``__init__.py`` at its top, so Python running in the
clone's parent folder (``''`` first on ``sys.path``) sees that folder as a namespace package ``dyvte``. setuptools'
default editable install for a flat layout is an import hook appended to ``sys.meta_path``, which Python asks only
after its path finder has returned that namespace package: ``import dyvte`` gave an empty module
(``module 'dyvte' has no attribute 'withdraw'``). With ``package-dir = {"" = "."}`` (pyproject.toml) the editable
install is a plain path entry instead, and a regular package anywhere on ``sys.path`` wins over a namespace one.

The test builds the editable wheel of a fresh ``git clone`` named ``dyvte`` with setuptools' PEP 660 hook (what
``pip install -e`` calls), installs it into a folder of its own, and imports ``dyvte`` in a fresh interpreter whose
working directory is the clone's parent; this interpreter's own install of dyvte is left out (``-S``: no ``.pth`` file
of its site-packages runs).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
GIT = shutil.which("git")
pytestmark = pytest.mark.skipif(GIT is None or not (REPO_ROOT / ".git").exists(), reason="needs git and a clone")

#: the pyproject.toml line that makes the editable install a path entry
PATH_ENTRY = 'package-dir = { "" = "." }'

BUILD = "import sys; from setuptools import build_meta; build_meta.build_editable(sys.argv[1])"

PROBE = """
import inspect, json, site, sys
sys.path.extend(json.loads(sys.argv[1]))  # torch, transformers, ...: their folders, without their .pth files
site.addsitedir(sys.argv[2])  # the throwaway install: its .pth files run, as they would in site-packages
import dyvte
try:
    withdraw = inspect.getsourcefile(dyvte.withdraw)
except AttributeError as error:
    withdraw = str(error)
print(json.dumps({"file": dyvte.__file__, "path": list(dyvte.__path__), "withdraw": withdraw}))
"""


def _install(clone: Path, target: Path) -> list[str]:
    """Build the clone's editable wheel (setuptools' PEP 660 hook, as ``pip install -e``), unpack it into ``target``
    and return the lines of its ``.pth`` file."""
    wheels = target.with_name(target.name + "-wheel")
    subprocess.run([sys.executable, "-c", BUILD, str(wheels)], cwd=clone, capture_output=True, check=True, timeout=120)
    (wheel,) = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    (pth,) = target.glob("*.pth")
    return pth.read_text().splitlines()


def _import_from(folder: Path, install: Path) -> dict:
    """``import dyvte`` in a fresh interpreter working in ``folder``, with ``install`` as its only dyvte install."""
    done = subprocess.run(
        [sys.executable, "-E", "-S", "-c", PROBE, json.dumps(site.getsitepackages()), str(install)],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": ""},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _builds_wheels() -> bool:
    """Whether this interpreter's setuptools can build a wheel: its own ``bdist_wheel`` (setuptools >= 70.1) or the
    ``wheel`` package's (``.ci/run`` upgrades the setuptools of Python 3.11's venv, 65.5, which has neither)."""
    try:
        return any(importlib.util.find_spec(name) for name in ("setuptools.command.bdist_wheel", "wheel"))
    except ModuleNotFoundError:
        return False


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A ``git clone`` of the repository in a folder named ``dyvte``, with this working tree's pyproject.toml."""
    pytest.importorskip("setuptools", minversion="64")  # PEP 660 editable wheels
    if not _builds_wheels():
        pytest.skip("this setuptools cannot build wheels (needs setuptools >= 70.1 or the wheel package)")
    root = tmp_path_factory.mktemp("parent")
    subprocess.run([GIT, "clone", "-q", str(REPO_ROOT), str(root / "dyvte")], check=True, timeout=120)
    shutil.copy(REPO_ROOT / "pyproject.toml", root / "dyvte" / "pyproject.toml")  # what is tested: the file on disk
    return root / "dyvte"


def test_import_from_the_parent_of_a_clone_named_dyvte(clone):
    lines = _install(clone, clone.parent / "site")
    assert lines == [str(clone)]  # a path entry, not an import hook
    found = _import_from(clone.parent, clone.parent / "site")
    assert found["file"] == str(clone / "dyvte" / "__init__.py")
    assert found["withdraw"] == str(clone / "dyvte" / "policies" / "withdraw.py")


def test_without_the_path_entry_the_clone_folder_shadows_the_install(clone):
    # the same check on setuptools' default (an import hook): it fails as the issue says, so the test above can fail
    pyproject = clone / "pyproject.toml"
    text = pyproject.read_text()
    assert PATH_ENTRY in text
    pyproject.write_text(text.replace(PATH_ENTRY, ""))
    try:
        lines = _install(clone, clone.parent / "site-hook")
    finally:
        pyproject.write_text(text)
    assert lines[0].startswith("import __editable__")
    found = _import_from(clone.parent, clone.parent / "site-hook")
    assert found["file"] is None and found["path"] == [str(clone)]  # the clone's folder as a namespace package
    assert found["withdraw"] == "module 'dyvte' has no attribute 'withdraw'"
