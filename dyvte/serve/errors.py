"""The server's refusals: one exception with an HTTP status, rendered as OpenAI's error JSON."""

from __future__ import annotations

from typing import Any

__all__ = ["RequestError", "error_body"]


class RequestError(ValueError):
    """A request the server refuses; the message says what to fix.

    Args:
        message: what is wrong and how to fix it.
        param: the request field at fault (``"messages[0].content[1].image_url"``), or ``None``.
        code: a short machine-readable code (``"invalid_image"``), also the metrics' error type.
        status: the HTTP status (4xx).
    """

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request", status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status

    def body(self) -> dict[str, Any]:
        """OpenAI's error JSON."""
        return error_body(self.message, self.param, self.code)


def error_body(message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"):
    """``{"error": {"message", "type", "param", "code"}}``, as the OpenAI API answers an error."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
