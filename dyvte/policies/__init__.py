"""Exit policies: static K, calibrated K, learned exit heads and FastV, one module each (docs/design.md §4).

Importing this package registers them. Adding a policy: a module with an :class:`dyvte.engine.policy.ExitPolicy`
subclass and its :func:`dyvte.engine.policy.register_policy` call, imported below (or anywhere before use: the
registry does not care where the module lives).
"""

from dyvte.policies import calibrated, fastv, learned, static  # noqa: F401  (each registers its policies)
