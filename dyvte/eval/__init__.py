"""Measurement: the evaluation harness, its methods parsed through the registries, analytic FLOPs and KV bytes,
timing checks and benchmark helpers."""
