"""Serve a model with visual-token withdrawal: an OpenAI-compatible chat server and a chat page, on localhost.

    python train/serve.py                                  # the demo model with its committed exit heads
    python train/serve.py --port 8080 --allow_local_files
    python train/serve.py --model path/to/llava --heads path/to/heads --layer 16

It logs ``serving http://127.0.0.1:8000`` once the model is loaded (``GET /health`` answers ``{"status": "ok"}``
from then on); SIGTERM or Ctrl-C stops it after the in-flight requests finish (up to ``--drain_timeout`` seconds).
Requests: docs/guide.md, "Serving".

The job is :mod:`dyvte.cli.serve`; ``dyvte serve`` (the console script) and ``python -m dyvte serve`` run it too,
with the same options.
"""

from dyvte.cli.serve import main, run  # noqa: F401  (main: the job, for scripts and tests that load this file)

if __name__ == "__main__":
    import sys

    from dyvte.cli import user_errors

    sys.exit(user_errors(run, None, None, "serve.py"))  # a refused input: one error line, status 2
