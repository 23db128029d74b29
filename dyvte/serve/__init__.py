"""``dyvte serve``: an OpenAI-compatible chat server with per-request visual-token withdrawal (docs/guide.md,
"Serving").

* :mod:`dyvte.serve.parse` checks a chat-completions request and turns it into a dyvte record;
* :mod:`dyvte.serve.runner` holds the model and the batching worker (one model call per batch and method);
* :mod:`dyvte.serve.app` is the HTTP app (FastAPI, run by uvicorn), :mod:`dyvte.serve.metrics` its Prometheus text;
* :mod:`dyvte.serve.errors` the refusals (OpenAI's error JSON).

Needs the ``serve`` extra (``pip install 'dyvte[serve]'``); nothing here is imported by ``import dyvte``.
"""
