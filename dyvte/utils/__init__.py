"""Utilities every layer may use: atomic writes, argument checks, eval mode, devices, method-string syntax."""
