#!/usr/bin/env bash
# Install lmms-eval for dyvte's lmms-eval model plugin (docs/guide.md, "lmms-eval"), into the active Python
# environment, without torchvision, timm or opencv.
#
#   bash train/install_lmms_eval.sh            # from the repository root or anywhere; pins from constraints.txt
#
# lmms-eval 0.7.3's package metadata requires torchvision, timm, opencv-python-headless and ~50 more packages; on a
# CPU-only torch torchvision breaks transformers' image processors, so lmms-eval is installed with --no-deps and only
# what its import path needs is added (measured: `python -m lmms_eval --model dyvte ... --tasks dyvte_demo` runs with
# exactly these, and imports none of torchvision, timm, cv2, decord):
#   pytz, loguru, evaluate, sacrebleu, tenacity  imported by lmms_eval, lmms_eval.api.model.lmms, lmms_eval.evaluator
#   pytablewriter (and its own dependencies)     the results table the CLI prints at the end (lmms_eval.utils)
#   filelock < 4                                 lmms_eval.evaluator patches filelock._api, which filelock 4 removed
#   datasets, accelerate, PyYAML                 imported by lmms_eval too (already there with dyvte[train])
# DEPS, resolved normally, is the extra dyvte[lmms-eval] in pyproject.toml (tests/integrations/test_install_lmms_eval.py
# checks that they agree). TABLE is installed with --no-deps too: pytablewriter 1.x needs typepy[datetime], whose
# python-dateutil < 3 conflicts with the locked 4.0 (a resolver then falls back to pytablewriter 0.38, which prints
# the table's header as A, B, C...); the table needs none of typepy's date parsing. Every version comes from the lock file constraints.txt; set LMMS_CONSTRAINTS= (empty) to
# resolve freely (.ci/lock does, to refresh the lock).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
constraints="${LMMS_CONSTRAINTS-$root/constraints.txt}"
pin=()
if [ -n "$constraints" ]; then
  pin=(-c "$constraints")
fi
LMMS_EVAL="lmms-eval==0.7.3"
DEPS=(pytz loguru evaluate sacrebleu tenacity "filelock>=3.10,<4" datasets accelerate PyYAML)
TABLE=("pytablewriter>=1.2,<2" DataProperty mbstrdecoder pathvalidate tabledata tcolorpy typepy chardet)

python -m pip install --quiet --no-deps "$LMMS_EVAL" "${pin[@]}"
# pip then warns that lmms-eval's other requirements (wandb, yt-dlp, av, ...) are not installed: expected, they are
# what --no-deps leaves out
python -m pip install --quiet "${DEPS[@]}" "${pin[@]}"
python -m pip install --quiet --no-deps "${TABLE[@]}" "${pin[@]}"

banned=$(python -m pip list 2>/dev/null \
  | grep -iE '^(torchvision|timm|open.clip|opencv-python|opencv-python-headless|opencv-contrib-python) ' || true)
if [ -n "$banned" ]; then
  echo "install_lmms_eval.sh: these must not be installed (they break transformers' image processors):" >&2
  echo "$banned" >&2
  exit 1
fi
# the import path the plugin needs, with none of the banned modules loaded
python - <<'PY'
import sys

import lmms_eval  # noqa: F401
import lmms_eval.api.model  # noqa: F401
import lmms_eval.evaluator  # noqa: F401
import lmms_eval.models  # noqa: F401  (builds the model registry from the lmms_eval.models entry points)
import pytablewriter  # noqa: F401  (lmms_eval.utils.make_table)

loaded = sorted(m for m in sys.modules if m.split(".")[0] in {"torchvision", "timm", "cv2", "decord", "open_clip"})
if loaded:
    sys.exit(f"install_lmms_eval.sh: importing lmms_eval loaded {loaded}")
from importlib.metadata import version

print(f"lmms-eval {version('lmms_eval')} installed with --no-deps; no torchvision, timm or opencv")
PY
