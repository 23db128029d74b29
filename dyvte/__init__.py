"""dyvte: visual-token withdrawal (VTW), learned dynamic exit (DyVTE) and pruning for HF vision-language models."""

from .registry import REGISTRY, UnsupportedModelError, supported_model_types
from .withdraw import Withdrawal, WithdrawalError, withdraw

__all__ = [
    "REGISTRY",
    "UnsupportedModelError",
    "Withdrawal",
    "WithdrawalError",
    "supported_model_types",
    "withdraw",
]
