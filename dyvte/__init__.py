"""dyvte: visual-token withdrawal (VTW), learned dynamic exit (DyVTE) and pruning for HF vision-language models."""

from .calibrate import Calibration, calibrate
from .data import DataError
from .evaluate import EvalResult, evaluate
from .flops import PrefillFlops, prefill_flops, prefill_kv_bytes
from .heads import ExitHeads, ExitHeadsConfig
from .methods import Calibrated, Full, Heads, Prune, Static
from .prune import PruneError, Pruning, prune
from .registry import REGISTRY, UnsupportedModelError, supported_model_types
from .withdraw import Withdrawal, WithdrawalError, withdraw

__all__ = [
    "REGISTRY",
    "Calibrated",
    "Calibration",
    "DataError",
    "EvalResult",
    "ExitHeads",
    "ExitHeadsConfig",
    "Full",
    "Heads",
    "PrefillFlops",
    "Prune",
    "PruneError",
    "Pruning",
    "Static",
    "UnsupportedModelError",
    "Withdrawal",
    "WithdrawalError",
    "calibrate",
    "evaluate",
    "prefill_flops",
    "prefill_kv_bytes",
    "prune",
    "supported_model_types",
    "withdraw",
]
