"""``python -m dyvte COMMAND [OPTIONS]``: the ``dyvte`` command (:mod:`dyvte.cli`)."""

import sys

from dyvte.cli import main

if __name__ == "__main__":
    sys.exit(main())
