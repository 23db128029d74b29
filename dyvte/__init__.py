"""dyvte: visual-token withdrawal (VTW), learned dynamic exit (DyVTE) and pruning for HF vision-language models.

The package's layers, bottom to top (docs/design.md, "Module map"): ``utils``; ``engine`` (hooks, layouts, masks,
caches, the family registry); ``policies`` (static, calibrated, learned exit heads, FastV) and ``pruning`` (before
the LLM); ``demo`` and ``data``; ``exits`` (labels, rules, risk control, KL calibration); ``eval`` and ``train``.
This file only re-exports the public API.
"""

from dyvte.data.errors import DataError
from dyvte.engine.registry import REGISTRY, UnsupportedModelError, supported_model_types
from dyvte.eval.flops import PrefillFlops, prefill_flops, prefill_kv_bytes
from dyvte.eval.harness import EvalResult, evaluate
from dyvte.eval.methods import Compose, Full, Method, MethodError, PolicyRun, PruningRun, parse_method
from dyvte.exits.kl import calibrate
from dyvte.policies.calibrated import Calibration
from dyvte.policies.exit_heads import ExitHeads, ExitHeadsConfig
from dyvte.policies.withdraw import Withdrawal, WithdrawalError, withdraw
from dyvte.pruning.prune import Pruning, PruningError, prune
from dyvte.utils.version import __version__

__all__ = [
    "REGISTRY",
    "Calibration",
    "Compose",
    "DataError",
    "EvalResult",
    "ExitHeads",
    "ExitHeadsConfig",
    "Full",
    "Method",
    "MethodError",
    "PolicyRun",
    "PrefillFlops",
    "Pruning",
    "PruningError",
    "PruningRun",
    "UnsupportedModelError",
    "Withdrawal",
    "WithdrawalError",
    "__version__",
    "calibrate",
    "evaluate",
    "parse_method",
    "prefill_flops",
    "prefill_kv_bytes",
    "prune",
    "supported_model_types",
    "withdraw",
]
