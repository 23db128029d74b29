"""Conversation records (LLaVA instruction JSON, ShareGPT, OpenAI messages) -> dyvte records, streamed from disk.

A conversation row (``llava_v1_5_mix665k.json`` style) is::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

ShareGPT rows use the same ``conversations`` with ``from`` in ``human`` / ``user`` / ``gpt`` / ``assistant``;
OpenAI-style rows use ``messages`` with ``role`` / ``content``, the content a string or a list of
``{"type": "text", "text"}`` and ``{"type": "image"}`` items, and ``images`` (a list) for the image paths.

Each assistant turn becomes one dyvte record: ``question`` = the user turn before it (image marker removed),
``answer`` = the assistant turn, ``context`` = the earlier ``(question, answer)`` turns, ``id`` / ``turn`` = the row's
id and the turn's number. The image goes in the first user turn whatever turn held the ``<image>`` marker (as
LLaVA's own preprocessing moves it). ``system`` turns are dropped.

* Text-only rows (no image and no marker; LLaVA's mix has about 40k) are skipped and counted in the log.
* Bad rows fail with a :class:`DataError` naming the file, the row and its id: a missing or unreadable image file,
  an empty question or answer, an ``<image>`` marker count that does not match the images, several images (dyvte's
  records hold one image), turns that do not alternate user / assistant, an unknown role. With ``skip_bad_rows``
  they are skipped instead and the log says how many and why (with the first few row ids per reason).

Records are converted in one streaming pass (the JSON array is parsed one row at a time, never loaded whole) into a
memory-mapped ``datasets.Dataset`` (``Dataset.from_generator``, cached by file path, size and time and options), so
memory stays flat however large the file.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from dyvte.data.answers import gold_text
from dyvte.data.errors import DataError
from dyvte.data.records import IMAGE_ERRORS, check_answer, check_question

__all__ = [
    "IMAGE_MARKER",
    "SkipReport",
    "conversation_records",
    "export_llava",
    "is_conversation_file",
    "iter_json_rows",
    "load_conversations",
    "parse_columns",
]

logger = logging.getLogger(__name__)

#: the image marker of LLaVA's instruction data
IMAGE_MARKER = "<image>"
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant", "model")
SYSTEM_ROLES = ("system",)
CONVERSATION_KEYS = ("conversations", "messages")
#: characters read per step while streaming a JSON array
CHUNK = 1 << 20


def iter_json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line, row)`` for each row of a JSON array file or a JSON Lines file, parsed one row at a time.

    Raises:
        DataError: not UTF-8, or not valid JSON (naming the file and line).
    """
    decoder = json.JSONDecoder()
    try:
        with open(path, encoding="utf-8-sig") as file:
            head = file.read(CHUNK)
            if head.lstrip().startswith("["):
                yield from _array_rows(path, file, head, decoder)
                return
            rest = head + file.readline()  # complete the last line of the first chunk
            number = 0
            for text in _lines(rest, file):
                number += 1
                if not text.strip():
                    continue
                try:
                    yield number, json.loads(text)
                except json.JSONDecodeError as error:
                    reason = f"not valid JSON ({error.msg}, column {error.colno})"
                    raise DataError(f"{path}, line {number}: {reason}") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error})") from error


def _lines(first: str, file) -> Iterator[str]:
    yield from first.splitlines()
    yield from file


def _array_rows(path: Path, file, buf: str, decoder: json.JSONDecoder) -> Iterator[tuple[int, Any]]:
    """The items of a top-level JSON array, decoded one at a time from a window of the file that slides on."""
    pos = buf.index("[") + 1
    line = 1 + buf.count("\n", 0, pos)  # line number at buf[pos]
    after_item = False
    first = True
    while True:
        while True:  # skip whitespace, reading on where the window ends
            while pos < len(buf) and buf[pos] in " \t\r\n":
                line += buf[pos] == "\n"
                pos += 1
            if pos < len(buf):
                break
            buf, pos = file.read(CHUNK), 0
            if not buf:
                raise DataError(f"{path}, line {line}: the JSON array is not closed (the file is truncated)")
        char = buf[pos]
        if after_item or (first and char == "]"):
            if char == "]":
                return
            if char != ",":
                raise DataError(f"{path}, line {line}: expected ',' or ']' between rows, got {char!r}")
            pos, after_item = pos + 1, False
            continue
        try:
            row, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError as error:
            more = file.read(CHUNK)
            if more:  # the row runs past the window: widen it and decode again
                buf, pos = buf[pos:] + more, 0
                continue
            at = line + buf.count("\n", pos, error.pos)
            raise DataError(f"{path}, line {at}: not valid JSON ({error.msg}): a truncated or malformed row") from None
        yield line, row
        line += buf.count("\n", pos, end)
        pos, after_item, first = end, True, False


def is_conversation_file(path: Path) -> bool:
    """Whether a ``.json`` / ``.jsonl`` file holds conversation rows (its first row has ``conversations`` or
    ``messages``)."""
    try:
        for _, row in iter_json_rows(path):
            return isinstance(row, Mapping) and any(key in row for key in CONVERSATION_KEYS)
    except DataError:
        return False  # the records reader reports the problem
    return False


class SkipReport:
    """Rows skipped while converting, by reason, with the first few row ids of each."""

    def __init__(self) -> None:
        self.text_only = 0
        self.bad: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)

    def skip(self, reason: str, row_id: str) -> None:
        self.bad[reason] += 1
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(row_id)

    def log(self, source: str, rows: int, samples: int) -> None:
        """Log the totals: INFO for text-only rows, WARNING for skipped bad rows."""
        logger.info("%s: %d rows -> %d samples (one per assistant turn)", source, rows, samples)
        if self.text_only:
            logger.info("%s: skipped %d text-only rows (no image)", source, self.text_only)
        if self.bad:
            detail = "; ".join(f"{n} {why} (e.g. {', '.join(self.examples[why])})" for why, n in self.bad.items())
            logger.warning("%s: skipped %d bad rows (--skip_bad_rows): %s", source, sum(self.bad.values()), detail)


class _BadRow(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _turns(row: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``[(role, content), ...]`` with roles normalized to ``user`` / ``assistant`` (system turns dropped)."""
    key = next(k for k in CONVERSATION_KEYS if k in row)
    turns = row[key]
    if not isinstance(turns, list) or not turns:
        raise _BadRow("no turns", f"{key!r} must be a non-empty list of turns, got {turns!r:.80}")
    out = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise _BadRow("bad turn", f"turn {k} is not an object: {turn!r:.80}")
        role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if role in SYSTEM_ROLES:
            continue
        if role in USER_ROLES:
            out.append(("user", content))
        elif role in ASSISTANT_ROLES:
            out.append(("assistant", content))
        else:
            known = USER_ROLES + ASSISTANT_ROLES + SYSTEM_ROLES
            raise _BadRow("unknown role", f"turn {k} has role {role!r} (expected one of {known})")
    return out


def _text(content: Any, k: int) -> tuple[str, int]:
    """A turn's text with image markers removed, and how many markers (or image items) it had."""
    if isinstance(content, str):
        markers = content.count(IMAGE_MARKER)
        text = content
        for sep in (IMAGE_MARKER + "\n", "\n" + IMAGE_MARKER, IMAGE_MARKER):
            text = text.replace(sep, "")
        return text.strip(), markers
    if isinstance(content, list):
        texts, markers = [], 0
        for item in content:
            kind = item.get("type") if isinstance(item, Mapping) else None
            if kind in ("image", "image_url"):
                markers += 1
            elif kind == "text" and isinstance(item.get("text"), str):
                text, inner = _text(item["text"], k)
                texts.append(text)
                markers += inner
            else:
                raise _BadRow("bad turn", f"turn {k} has a content item dyvte cannot read: {item!r:.80}")
        return " ".join(t for t in texts if t).strip(), markers
    raise _BadRow("bad turn", f"turn {k}'s content must be a string or a list of items, got {type(content).__name__}")


def _images(row: Mapping[str, Any]) -> list[Any]:
    images = row.get("image", row.get("images"))
    if images is None:
        return []
    return list(images) if isinstance(images, list) else [images]


def _image_path(image: Any, root: Path) -> str:
    """The absolute path of a row's image, checked to exist and to be an image PIL can identify."""
    if not isinstance(image, str) or not image:
        raise _BadRow("bad image", f"the image must be a file path (a string), got {image!r:.80}")
    path = Path(image) if Path(image).is_absolute() else root / image
    if not path.is_file():
        raise _BadRow("missing image file", f"the image file {path} does not exist")
    try:
        with Image.open(path) as opened:
            opened.size  # noqa: B018  (header only: cheap; truncated pixels still fail at labelling, named)
    except IMAGE_ERRORS as error:
        raise _BadRow("unreadable image", f"cannot read the image {path}: {error}") from None
    return str(path)


def conversation_records(row: Any, root: Path) -> list[dict[str, Any]]:
    """The dyvte records of one conversation row (``[]`` for a text-only row).

    Args:
        row: a parsed JSON row.
        root: the folder relative image paths are resolved against.

    Raises:
        _BadRow: the row cannot be used (reason and detail).
    """
    if not isinstance(row, Mapping) or not any(key in row for key in CONVERSATION_KEYS):
        raise _BadRow("not a conversation", f"expected an object with one of {CONVERSATION_KEYS}, got {row!r:.80}")
    turns = _turns(row)
    images = _images(row)
    texts = [(role, *_text(content, k)) for k, (role, content) in enumerate(turns)]
    markers = sum(m for _, _, m in texts)
    if not images and not markers:
        return []
    if markers != len(images):
        raise _BadRow(
            "image marker count mismatch",
            f"{markers} {IMAGE_MARKER} markers in its turns but {len(images)} image(s)",
        )
    if len(images) > 1:
        raise _BadRow("several images", f"{len(images)} images: dyvte records hold one image per sample")
    image = _image_path(images[0], root)
    records, context = [], []
    question = None
    for k, (role, text, _) in enumerate(texts):
        expected = "user" if k % 2 == 0 else "assistant"
        if role != expected:
            raise _BadRow("turns out of order", f"turn {k} is a {role} turn where a {expected} turn was expected")
        if role == "user":
            try:
                check_question(text, f"turn {k}")
            except DataError as error:
                raise _BadRow("empty question", str(error)) from None
            question = text
            continue
        try:
            check_answer(text, f"turn {k}")
        except DataError as error:
            raise _BadRow("empty answer", str(error)) from None
        records.append(
            {
                "image": {"path": image, "bytes": None},
                "question": question,
                "answer": text,
                "qtype": "all",
                "context": [{"question": q, "answer": a} for q, a in context],
                "id": str(row.get("id", "")),
                "turn": k,
            }
        )
        context.append((question, text))
    return records


def _features():
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "qtype": datasets.Value("string"),
            "context": datasets.List({"question": datasets.Value("string"), "answer": datasets.Value("string")}),
            "id": datasets.Value("string"),
            "turn": datasets.Value("int32"),
        }
    )


def _generate(path: str, root: str, skip_bad_rows: bool, limit: int | None, stamp: str) -> Iterator[dict]:
    """``Dataset.from_generator``'s generator (``stamp``: file size and time, part of the cache key only)."""
    report, rows, samples = SkipReport(), 0, 0
    for index, (line, row) in enumerate(iter_json_rows(Path(path))):
        rows += 1
        try:
            records = conversation_records(row, Path(root))
        except _BadRow as bad:
            row_id = row.get("id") if isinstance(row, Mapping) else None
            where = f"{path}, row {index} (line {line}" + (f", id {row_id!r})" if row_id is not None else ")")
            if not skip_bad_rows:
                raise DataError(
                    f"{where}: {bad} [{bad.reason}]; fix the row, or pass --skip_bad_rows true "
                    "(skip_bad_rows=True) to skip such rows with a count in the log"
                ) from None
            report.skip(bad.reason, str(row_id if row_id is not None else f"row {index}"))
            continue
        if not records:
            report.text_only += 1
        for record in records:
            if limit is not None and samples >= limit:
                report.log(path, rows, samples)
                return
            samples += 1
            yield record
    report.log(path, rows, samples)
    if samples == 0:
        raise DataError(f"{path}: no sample with an image and an answer in its {rows} rows")


def load_conversations(
    path: str | Path,
    image_folder: str | Path | None = None,
    skip_bad_rows: bool = False,
    limit: int | None = None,
    cache_dir: str | None = None,
):
    """A conversation file as a memory-mapped ``datasets.Dataset`` of dyvte records (see the module docstring).

    Args:
        path: a ``.json`` (array or JSON Lines) or ``.jsonl`` file of conversation rows.
        image_folder: the folder relative image paths are resolved against (default: the file's folder).
        skip_bad_rows: skip bad rows (counted in the log, by reason) instead of failing on the first.
        limit: keep the first ``limit`` samples.
        cache_dir: where ``datasets`` keeps the converted Arrow file (default: its own cache).

    Returns:
        Columns ``image`` (``datasets.Image``, by path), ``question``, ``answer``, ``qtype`` (``"all"``),
        ``context`` (earlier turns), ``id``, ``turn``.

    Raises:
        DataError: the file or the image folder does not exist, a bad row (without ``skip_bad_rows``), or no
            usable sample.
    """
    import datasets

    path = Path(path).resolve()
    if not path.is_file():
        raise DataError(f"{path}: no such records file")
    root = Path(image_folder).resolve() if image_folder is not None else path.parent
    if not root.is_dir():
        raise DataError(f"image folder {root} (--image_folder) does not exist")
    stat = path.stat()
    kwargs = {
        "path": str(path),
        "root": str(root),
        "skip_bad_rows": skip_bad_rows,
        "limit": limit,
        "stamp": f"{stat.st_size}:{stat.st_mtime_ns}",
    }
    try:
        return datasets.Dataset.from_generator(_generate, features=_features(), gen_kwargs=kwargs, cache_dir=cache_dir)
    except datasets.exceptions.DatasetGenerationError as error:
        cause = error.__cause__ or error
        if isinstance(cause, DataError):
            raise cause from None
        raise


def parse_columns(columns: str | Mapping[str, str] | None) -> dict[str, str]:
    """A column mapping ``{"image": source column, ...}`` from a mapping or ``"image=img,question=q,answer=a"``.

    Raises:
        ValueError: a malformed string, or a key other than ``image`` / ``question`` / ``answer`` / ``qtype``.
    """
    if columns is None:
        return {}
    if isinstance(columns, str):
        pairs = [part.split("=", 1) for part in columns.split(",") if part.strip()]
        if any(len(pair) != 2 or not pair[0].strip() or not pair[1].strip() for pair in pairs):
            raise ValueError(
                f"columns (--data.source.columns) {columns!r}: expected 'image=COLUMN,question=COLUMN,...'"
            )
        columns = {key.strip(): value.strip() for key, value in pairs}
    unknown = sorted(set(columns) - {"image", "question", "answer", "qtype"})
    if unknown:
        raise ValueError(
            f"columns (--data.source.columns): unknown field(s) {unknown}; map image, question, answer, qtype"
        )
    return dict(columns)


def export_llava(records, output_dir: str | Path, samples: int, name: str = "llava_format.json") -> Path:
    """Write ``samples`` records as a LLaVA instruction JSON with an image folder (a test and benchmark fixture).

    Records are taken in order and cycled when ``samples`` exceeds them (each image is written once and referenced
    by every row that repeats it; row ids stay distinct). Each row is one human turn ``"<image>\\n{question}"`` and
    one gpt turn ``answer``.

    Args:
        records: a sequence of records with a PIL ``image``, ``question`` and ``answer`` (e.g. a demo split).
        output_dir: folder for ``name`` and ``images/``.
        samples: rows to write.
        name: the JSON file's name.

    Returns:
        The JSON file's path (images in ``output_dir / "images"``, referenced relative to it as ``images/N.png``).
    """
    output_dir = Path(output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    count = len(records)
    path = output_dir / name
    with open(path, "w", encoding="utf-8") as file:
        file.write("[\n")
        for i in range(samples):
            record = records[i % count]
            image = f"images/{i % count}.png"
            if i < count:
                record["image"].save(output_dir / image)
            row = {
                "id": f"demo-{i}",
                "image": image,
                "conversations": [
                    {"from": "human", "value": f"{IMAGE_MARKER}\n{record['question']}"},
                    {"from": "gpt", "value": gold_text(record["answer"], f"record {i % count}")},
                ],
            }
            file.write(json.dumps(row) + (",\n" if i < samples - 1 else "\n"))
        file.write("]\n")
    return path
