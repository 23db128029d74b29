"""``dyvte serve`` = ``python train/serve.py``: an OpenAI-compatible server with per-request visual-token withdrawal.

    python train/serve.py                                  # the demo model with its committed exit heads, port 8000
    python train/serve.py --model DIR --heads DIR          # learned exits (heads, heads:P per request)
    python train/serve.py --model DIR --layer 16           # static withdrawal (static:16 per request)

The app is :mod:`dyvte.serve.app` (FastAPI, run by uvicorn); docs/guide.md, "Serving".
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from dyvte.cli.help import HelpOption, format_help, help_request

__all__ = ["main", "run", "short_help", "parser"]

logger = logging.getLogger("dyvte.serve")

DEMO = "demo"


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    """Every option of the server (``--help all``)."""
    p = argparse.ArgumentParser(prog=prog, description="Serve a model with visual-token withdrawal (OpenAI API).")
    p.add_argument("--model", default=DEMO, help="'demo' or a local model directory (default: demo)")
    p.add_argument(
        "--heads",
        default=None,
        help="an exit-heads directory: serve 'heads' and 'heads:P' (default: the demo's committed heads with the "
        "demo model, none otherwise); 'none' serves no heads",
    )
    p.add_argument("--layer", type=int, default=None, help="serve static withdrawal at exit layer K ('static:K')")
    p.add_argument("--calibration", default=None, help="a calibration directory: serve static:K at its K")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1, this machine)")
    p.add_argument("--port", type=int, default=8000, help="the port (default: 8000)")
    p.add_argument(
        "--allow_local_files", action="store_true", help="accept local paths and file:// URLs as images (data: always)"
    )
    p.add_argument("--max_batch_size", type=int, default=8, help="requests per model call at most (default: 8)")
    p.add_argument(
        "--batch_timeout", type=float, default=0.02, help="seconds a request waits for others to batch (default: 0.02)"
    )
    p.add_argument(
        "--drain_timeout", type=float, default=30.0, help="on SIGTERM, seconds to finish in-flight requests (30)"
    )
    p.add_argument("--max_image_pixels", type=int, default=None, help="an image's largest pixel count (4096*4096)")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (float16 with a CUDA --device only)")
    return p


def short_help(prog: str) -> str:
    """One screen: the main options and examples."""
    own = [
        HelpOption("--model DIR", "'demo' (default) or a local model directory"),
        HelpOption("--heads DIR", "exit heads: serve heads / heads:P (default with the demo: its committed heads)"),
        HelpOption("--layer K", "serve static withdrawal static:K"),
        HelpOption("--calibration DIR", "serve static:K at a calibration's K"),
        HelpOption("--host ADDR, --port N", "where to listen (default 127.0.0.1:8000)"),
        HelpOption("--allow_local_files", "accept local paths and file:// image URLs (data: URLs always)"),
        HelpOption("--max_batch_size N", "requests per model call at most (default 8)"),
        HelpOption("--batch_timeout S", "seconds a request waits for others to batch (default 0.02)"),
        HelpOption("--drain_timeout S", "on SIGTERM, seconds to finish in-flight requests (default 30)"),
        HelpOption("--device DEV, --dtype T", "cpu / cuda[:N]; float32 / bfloat16"),
    ]
    text = format_help(
        prog,
        "An OpenAI-compatible chat server (POST /v1/chat/completions, GET /v1/models, /health, /metrics, the chat "
        'page at /) whose requests pick full, static:K or heads[:P] in the extension field {"dyvte": {"method"}}.',
        [("serve options", own)],
        [f"{prog}", f"{prog} --model path/to/llava --heads path/to/heads --port 8080"],
    )
    return text.replace(" [--config FILE]", "", 1)  # no YAML config: every option is on the command line


def _load(options: argparse.Namespace):
    """The :class:`dyvte.serve.runner.ServedModel` the options name (runs in the loader thread)."""
    import dyvte
    from dyvte.data.sources import load_model
    from dyvte.demo import demo_checkpoint_dir
    from dyvte.serve.runner import ServedModel, model_name

    model, processor = load_model(options.model, options.dtype, device=options.device)
    heads_dir = options.heads
    if heads_dir is None and options.model == DEMO:
        heads_dir = str(demo_checkpoint_dir("demo-exit-heads"))
    heads = None
    if heads_dir is not None and heads_dir.lower() != "none":
        heads = dyvte.ExitHeads.from_pretrained(heads_dir).to(model.device)
    layer = options.layer
    if options.calibration is not None:
        calibration = dyvte.Calibration.load(options.calibration)
        if layer is not None and layer != calibration.layer:
            raise ValueError(f"--layer {layer} and --calibration (K = {calibration.layer}) disagree: give one")
        layer = calibration.layer
    name = model_name(demo_checkpoint_dir() if options.model == DEMO else options.model)
    return ServedModel(model, processor, name, heads, layer)


def main(options: argparse.Namespace) -> None:
    """Serve until SIGTERM / SIGINT (in-flight requests drained for up to ``--drain_timeout`` seconds)."""
    import uvicorn

    from dyvte.serve.app import ServeOptions, State, create_app
    from dyvte.serve.parse import MAX_IMAGE_PIXELS

    for name, value, low in (("--max_batch_size", options.max_batch_size, 1), ("--port", options.port, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    for name, value in (("--batch_timeout", options.batch_timeout), ("--drain_timeout", options.drain_timeout)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0 seconds, got {value}")
    if options.model != DEMO and not Path(options.model).is_dir():
        raise FileNotFoundError(f"--model {options.model}: no such directory (use 'demo' for the embedded model)")
    pixels = options.max_image_pixels or MAX_IMAGE_PIXELS
    state = State(ServeOptions(options.allow_local_files, options.max_batch_size, options.batch_timeout, pixels))
    server: uvicorn.Server | None = None

    def ready() -> None:
        while server is not None and not server.started and not server.should_exit:  # the socket listens
            time.sleep(0.01)
        served = state.served
        logger.info(
            "model %s, methods %s (default %s)", served.model_id, ", ".join(served.methods), served.default_method
        )
        logger.info("serving http://%s:%d", options.host, options.port)

    app = create_app(state, lambda: _load(options), ready)
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level="warning",
        timeout_graceful_shutdown=math.ceil(options.drain_timeout),  # None would wait forever
    )
    server = uvicorn.Server(config)
    server.run()  # on SIGTERM / SIGINT: stops listening, drains, then re-raises the signal (uvicorn)


def run(args: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Parse the command line (``-h``: the short help; ``--help all``: every option) and serve."""
    prog = prog or Path(sys.argv[0]).name
    mode, args = help_request(sys.argv[1:] if args is None else args)
    if mode == "short":
        print(short_help(prog))
        raise SystemExit(0)
    options = parser(prog).parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(options)
