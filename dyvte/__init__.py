"""dyvte: visual-token withdrawal (VTW), learned dynamic exit (DyVTE) and pruning for HF vision-language models."""

from .flops import PrefillFlops, prefill_flops
from .registry import REGISTRY, UnsupportedModelError, supported_model_types
from .withdraw import Withdrawal, WithdrawalError, withdraw

__all__ = [
    "PrefillFlops",
    "REGISTRY",
    "UnsupportedModelError",
    "Withdrawal",
    "WithdrawalError",
    "prefill_flops",
    "supported_model_types",
    "withdraw",
]
