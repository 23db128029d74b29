"""The built-in exit policies, one module each; importing this package registers them (docs/design.md §4).

Adding a policy: a module here with an :class:`dyvte.policy.ExitPolicy` subclass and its
:func:`dyvte.policy.register_policy` call, plus its import line below.
"""

from .. import fastv  # noqa: F401  (FastV's ranking, registered as "fastv")
from . import calibrated, heads, static  # noqa: F401  (each registers its policies)
