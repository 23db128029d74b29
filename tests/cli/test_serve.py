"""``dyvte serve`` / ``train/serve.py`` refuses bad options with one error line and status 2, before loading anything
(the server itself: tests/serve)."""

from __future__ import annotations

import pytest

from dyvte.cli import main

from ..tools import require_module


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max_batch_size", "0"], "--max_batch_size must be >= 1, got 0"),
        (["--batch_timeout", "-1"], "--batch_timeout must be >= 0 seconds, got -1.0"),
        (["--drain_timeout", "nan"], "--drain_timeout must be >= 0 seconds, got nan"),
        (["--model", "/no/such/model"], "--model /no/such/model: no such directory"),
    ],
)
def test_bad_serve_options_are_one_error_line(capsys, argv, message):
    require_module("fastapi", tool="serve", install="pip install -e '.[serve]'")
    assert main(["serve", *argv]) == 2
    assert f"dyvte serve: error: {message}" in capsys.readouterr().err
