"""An OpenAI chat-completions request checked and turned into a dyvte record (docs/guide.md, "Serving").

What the server accepts: ``messages`` of ``user`` / ``assistant`` turns ending with a ``user`` turn, whose content is
a string or a list of ``text`` and ``image_url`` parts, with exactly one image in the whole conversation (the
harness's prompt takes one: :func:`dyvte.data.records.build_inputs`); earlier user/assistant pairs become the record's
``context``. Images come as ``data:`` URLs (always), local paths or ``file://`` URLs (only with
``--allow_local_files``); remote URLs are refused. Everything refused raises :class:`dyvte.serve.errors.RequestError`
with a message that says what to fix.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from dyvte.serve.errors import RequestError

__all__ = ["ChatRequest", "Limits", "MAX_IMAGE_PIXELS", "decode_image", "parse_method", "parse_request"]

#: the most pixels an image may have (a decompression bomb: a few KB of PNG can hold a 100k x 100k image)
MAX_IMAGE_PIXELS = 4096 * 4096
#: the longest a stop list may be (OpenAI's limit)
MAX_STOPS = 4
_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)$", re.DOTALL)
_ROLES = ("user", "assistant")


@dataclass(frozen=True)
class Limits:
    """What the running server takes.

    Attributes:
        methods: the method strings the server was started with (``full``, ``static:K``, ``heads``).
        default_method: the method of a request that names none.
        allow_local_files: local paths and ``file://`` URLs are read.
        max_image_pixels: an image's largest pixel count.
        max_positions: the model's context length (prompt + answer tokens).
    """

    methods: tuple[str, ...]
    default_method: str
    allow_local_files: bool = False
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_positions: int | None = None


@dataclass
class ChatRequest:
    """A checked request: one record and how to answer it.

    Attributes:
        record: ``{"image": PIL image, "question": str, "context": [(q, a), ...]}`` for ``build_inputs``.
        method: ``full``, ``static:K``, ``heads`` or ``heads:P``.
        threshold: P for ``heads:P`` (``None``: the heads' calibrated thresholds).
        max_tokens: answer tokens at most.
        temperature, top_p, seed: sampling (``temperature == 0``: greedy).
        stop: strings that end the answer (not included).
        stream: answer by server-sent events.
        model: the model name the client asked for (echoed back).
    """

    record: dict[str, Any]
    method: str
    threshold: float | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    model: str | None = None

    @property
    def greedy(self) -> bool:
        """Deterministic decoding (temperature 0): such requests may share a batch."""
        return self.temperature == 0.0


def parse_method(value: Any, limits: Limits) -> tuple[str, float | None]:
    """The ``dyvte.method`` of a request: ``(method, heads threshold or None)``.

    Raises:
        RequestError: not a string, an unknown form, a threshold outside (0, 1], or a method the server was not
            started with.
    """
    param = "dyvte.method"
    if value is None:
        return limits.default_method, None
    if not isinstance(value, str):
        raise RequestError(f"dyvte.method must be a string such as 'heads', got {value!r}", param)
    method, threshold = value.strip(), None
    if method.startswith("heads:"):
        text = method.partition(":")[2]
        try:
            threshold = float(text)
        except ValueError:
            message = f"dyvte.method {value!r}: the heads threshold P must be a number in (0, 1]"
            raise RequestError(message, param, code="invalid_threshold") from None
        if not 0.0 < threshold <= 1.0:
            raise RequestError(
                f"dyvte.method {value!r}: the heads threshold P must be in (0, 1] (P = 0 would fire every head on "
                f"every row, P > 1 none), got {threshold:g}",
                param,
                code="invalid_threshold",
            )
        method = "heads"
    if method not in limits.methods:
        raise RequestError(
            f"dyvte.method {value!r} is not served: this server was started with {', '.join(limits.methods)} "
            "(restart it with --heads DIR for heads, --layer K or --calibration DIR for static:K)",
            param,
            code="method_not_served",
        )
    return method, threshold


def decode_image(url: Any, limits: Limits, param: str) -> Image.Image:
    """The decoded image of an ``image_url``: a ``data:`` URL, or a local path / ``file://`` URL where allowed.

    Raises:
        RequestError: a remote or refused URL, bad base64, bytes that are no image, a truncated image, or more
            pixels than ``limits.max_image_pixels``.
    """
    if not isinstance(url, str) or not url:
        raise RequestError("image_url.url must be a non-empty string (a data:image/...;base64,... URL)", param)
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url) and not url.startswith("file://"):
        raise RequestError(
            f"remote image URLs are not fetched by this server ({url[:40]!r}...): send the image inline as a "
            "data:image/png;base64,... URL",
            param,
            code="remote_url_refused",
        )
    if url.startswith("data:"):
        match = _DATA_URL.match(url)
        if match is None or ";base64" not in match.group("params"):
            message = "a data: URL must be base64: data:image/png;base64,<base64 bytes>"
            raise RequestError(message, param, code="invalid_image")
        try:
            raw = base64.b64decode(match.group("data"), validate=True)
        except (binascii.Error, ValueError) as err:
            raise RequestError(
                f"the data: URL's base64 is invalid or truncated ({err}): send the whole file, base64-encoded",
                param,
                code="invalid_image",
            ) from None
        source: Any = io.BytesIO(raw)
    else:
        if not limits.allow_local_files:
            raise RequestError(
                "local image paths are refused: start the server with --allow_local_files to read files on the "
                "server's machine, or send the image as a data:image/png;base64,... URL",
                param,
                code="local_files_refused",
            )
        path = Path(url.removeprefix("file://"))
        if not path.is_file():
            raise RequestError(f"no image file at {str(path)!r} on the server", param, code="invalid_image")
        source = path
    return _open(source, limits.max_image_pixels, param)


def _open(source: Any, max_pixels: int, param: str) -> Image.Image:
    """Open, check the pixel count before decoding, and decode fully (a truncated file fails here)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
            width, height = image.size
            if width * height > max_pixels:
                raise RequestError(
                    f"the image has {width}x{height} = {width * height} pixels, more than this server takes "
                    f"({max_pixels}): send a smaller image (the model resizes it anyway)",
                    param,
                    code="image_too_large",
                )
            image.load()
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(
            f"the image has more pixels than this server takes ({max_pixels}): send a smaller image",
            param,
            code="image_too_large",
        ) from None
    except UnidentifiedImageError:
        raise RequestError(
            "the image bytes are not an image PIL can read (PNG, JPEG, ...): check the data: URL's content",
            param,
            code="invalid_image",
        ) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise RequestError(
            f"the image could not be decoded ({err}): it is truncated or corrupt; send the whole file",
            param,
            code="invalid_image",
        ) from None
    return image  # build_inputs makes it the RGB image a person sees (dyvte.data.images.to_rgb), as offline


def _parts(content: Any, where: str) -> list[tuple[str, Any, str]]:
    """A message's content as ``(kind, value, param)`` parts: ``("text", str)`` or ``("image", url)``."""
    if isinstance(content, str):
        return [("text", content, f"{where}.content")]
    if not isinstance(content, list) or not content:
        raise RequestError(f"{where}.content must be a string or a non-empty list of parts", f"{where}.content")
    parts = []
    for i, part in enumerate(content):
        param = f"{where}.content[{i}]"
        if not isinstance(part, dict):
            raise RequestError(f"{param} must be an object with a 'type'", param)
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise RequestError(f"{param}.text must be a string", f"{param}.text")
            parts.append(("text", text, param))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            parts.append(("image", url, f"{param}.image_url"))
        else:
            raise RequestError(
                f"{param}: content type {kind!r} is not supported; use 'text' or 'image_url'",
                f"{param}.type",
                code="unsupported_content_type",
            )
    return parts


def _text(parts: list[tuple[str, Any, str]]) -> str:
    return "\n".join(value for kind, value, _ in parts if kind == "text")


def _number(body: dict, name: str, default: Any, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise RequestError(f"{name} must be {kind} in [{low:g}, {high:g}], got {value!r}", name)
    return value


def parse_request(body: Any, limits: Limits) -> ChatRequest:
    """Check a decoded JSON body and build its :class:`ChatRequest`.

    Raises:
        RequestError: anything the server does not take (the message names the field and the fix).
    """
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object with 'messages'")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' is required: a non-empty list of {role, content} objects", "messages")
    turns: list[tuple[str, list[tuple[str, Any, str]]]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if role not in _ROLES:
            raise RequestError(
                f"{where}.role {role!r} is not supported: use 'user' and 'assistant' (this model's prompt is a "
                "question with one image, optionally after earlier user/assistant turns; no system prompt)",
                f"{where}.role",
                code="unsupported_role",
            )
        turns.append((role, _parts(message.get("content"), where)))
    roles = [role for role, _ in turns]
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(roles))]
    if roles != expected or roles[-1] != "user":
        raise RequestError(
            f"messages must alternate user, assistant, ..., and end with a user turn; got roles {roles}", "messages"
        )
    images = [(value, param) for _, parts in turns for kind, value, param in parts if kind == "image"]
    if len(images) != 1:
        raise RequestError(
            f"this model's prompt takes exactly one image per conversation (one image placeholder), got "
            f"{len(images)}: send one image_url part",
            "messages",
            code="image_count",
        )
    image = decode_image(images[0][0], limits, images[0][1])
    question = _text(turns[-1][1])
    if not question.strip():
        raise RequestError("the last user message has no text: ask a question", f"messages[{len(turns) - 1}].content")
    context = [(_text(turns[i][1]), _text(turns[i + 1][1])) for i in range(0, len(turns) - 1, 2)]
    record: dict[str, Any] = {"image": image, "question": question}
    if context:
        record["context"] = context
    if body.get("n") not in (None, 1):
        raise RequestError(f"n must be 1 (one answer per request), got {body.get('n')!r}", "n")
    limit = limits.max_positions or 1_000_000
    tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= limit):
        raise RequestError(
            f"max_tokens must be an integer in [1, {limit}] (the model's context length), got {tokens!r}",
            "max_tokens",
            code="invalid_max_tokens",
        )
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is None:
        stops = []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {stream!r}", "stream")
    extension = body.get("dyvte")
    if extension is not None and not isinstance(extension, dict):
        raise RequestError("dyvte must be an object such as {'method': 'heads'}", "dyvte")
    method, threshold = parse_method((extension or {}).get("method"), limits)
    model = body.get("model")
    return ChatRequest(
        record=record,
        method=method,
        threshold=threshold,
        max_tokens=16 if tokens is None else tokens,
        temperature=float(_number(body, "temperature", 0.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 1e-6, 1.0)),
        seed=_number(body, "seed", None, -(2**63), 2**63 - 1, integer=True),
        stop=list(stops),
        stream=stream,
        model=model if isinstance(model, str) else None,
    )
