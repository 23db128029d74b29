"""Integrations with outside harnesses (the top layer beside ``cli``): the lmms-eval model plugin ``dyvte``."""
