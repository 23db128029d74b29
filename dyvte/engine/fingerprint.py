"""Model fingerprints: what ties exit heads, calibrations and label caches to the model they were made on.

Exit heads and a KL calibration carry a promise ("at most 1% of the answers differ", "KL <= eta from layer K on")
that was measured on one model. Another model of the same type, width and depth (a fine-tune, a LoRA-merged copy)
passes every structural check, and the promise silently stops holding (issue 28: the demo's heads on the LoRA-merged
demo, 0.9% -> 18.8% of the answers differ). :func:`model_fingerprint` summarizes a loaded model in a few fields;
:func:`check_fingerprint` compares a saved fingerprint with a model and refuses a mismatch, naming each field that
differs, unless ``allow_other_model=True`` (then it logs a warning).

Fields (``format`` 1):

- ``model_type``: the model's ``config.model_type``;
- ``architecture``: the text decoder's layer count, hidden size and vocabulary size;
- ``weights``: sha256 (16 hex digits) of a deterministic sample of every parameter (``SAMPLES_PER_TENSOR`` values
  spread over each tensor, plus every shape), twice: the sample rounded to ``bfloat16`` and to ``float16``. The same
  checkpoint loaded in float32, bfloat16 or float16 matches through one of the two; a fine-tune, a merged adapter or
  a loaded (unmerged) adapter changes both;
- ``tokenizer`` (when a processor is given): sha256 of the vocabulary, the chat template and an attached
  ``prompt_template``;
- ``dyvte``: the version that wrote it (recorded, never compared: a new dyvte reads an old file).

Cost: one gather of a few values per parameter tensor and one host copy, whatever the tensors' sizes (the demo:
under 10 ms on one CPU thread).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dyvte.engine.registry import resolve
from dyvte.utils.version import __version__

__all__ = [
    "FINGERPRINT_FORMAT",
    "ModelMismatchError",
    "check_fingerprint",
    "files_digest",
    "fingerprint_differences",
    "model_fingerprint",
    "tokenizer_digest",
    "weights_digest",
]

logger = logging.getLogger(__name__)

FINGERPRINT_FORMAT = 1
#: values sampled from each parameter tensor
SAMPLES_PER_TENSOR = 32
#: the precisions the weight sample is hashed in (the same checkpoint in float32 / bfloat16 / float16 matches one)
ROUNDINGS = {"bfloat16": torch.bfloat16, "float16": torch.float16}
#: a large odd multiplier: sample ``j`` of a tensor of ``n`` values is ``(j * STRIDE + OFFSET) % n``, spread over
#: rows and columns alike (an even stride through a matrix would read one column only)
STRIDE, OFFSET = 2654435761, 12345
#: the attribute under which ``dyvte.data.prompts.attach_prompt_template`` keeps a prompt template on a processor
PROMPT_TEMPLATE_ATTR = "dyvte_prompt_template"
#: option name of the override, for messages
OVERRIDE = "allow_other_model=True (on the command line: --allow_other_model true)"


class ModelMismatchError(ValueError):
    """Exit heads, a calibration or a LoRA adapter made for another model than the one given; the message names
    each field that differs."""


def _digest(*parts: bytes) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part)
    return hasher.hexdigest()[:16]


def _sample_indices(numel: int) -> torch.Tensor:
    if numel <= SAMPLES_PER_TENSOR:
        return torch.arange(numel)
    return (torch.arange(SAMPLES_PER_TENSOR, dtype=torch.int64) * STRIDE + OFFSET) % numel


def weights_digest(model: nn.Module) -> dict[str, str]:
    """``{"bfloat16": sha, "float16": sha}``: the hash of a deterministic sample of every parameter of ``model``.

    Every parameter (shared ones once), in registration order: its shape, and ``SAMPLES_PER_TENSOR`` of its values
    (all of them for smaller tensors). Parameter names are left out, so that a transformers release that renames
    modules keeps the digest. Parameters on the ``meta`` device (offloaded) contribute their shape only.
    """
    shapes: list[list[int]] = []
    samples: list[torch.Tensor] = []
    with torch.no_grad():
        for _, param in model.named_parameters():
            shapes.append(list(param.shape))
            if param.device.type == "meta" or param.numel() == 0:
                continue
            flat = param.detach().reshape(-1)
            samples.append(flat[_sample_indices(flat.numel()).to(flat.device)].float())
        if not samples:
            values = torch.zeros(0)
        elif len({s.device for s in samples}) == 1:  # one copy to the host
            values = torch.cat(samples).cpu()
        else:  # a model spread over devices (device_map)
            values = torch.cat([s.cpu() for s in samples])
    header = json.dumps(shapes).encode()
    return {
        name: _digest(header, values.to(dtype).view(torch.int16).numpy().tobytes()) for name, dtype in ROUNDINGS.items()
    }


def tokenizer_digest(processor: Any) -> str:
    """sha256 (16 hex digits) of a processor's (or tokenizer's) vocabulary, chat template and attached
    ``prompt_template``: what turns a question into the token ids the model sees."""
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:  # a tokenizer itself
        tokenizer = processor
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if not callable(get_vocab):
        raise TypeError(
            f"processor: expected a processor or tokenizer with get_vocab(), got {type(processor).__name__}"
        )
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    payload = {
        "vocab": sorted(get_vocab().items()),
        "chat_template": template,
        "prompt_template": getattr(processor, PROMPT_TEMPLATE_ATTR, None),
    }
    return _digest(json.dumps(payload, sort_keys=True, default=str).encode())


def model_fingerprint(model: nn.Module, processor: Any = None) -> dict[str, Any]:
    """The fingerprint of a loaded model (and its processor), saved with the heads, calibrations and label caches
    made on it (see the module docstring for the fields).

    Args:
        model: a supported ``...ForConditionalGeneration`` model (a peft wrapper is unwrapped; a loaded adapter's
            tensors count, so an adapted model never matches its base).
        processor: its processor or tokenizer; adds the ``tokenizer`` field.

    Returns:
        A JSON-serializable dict.
    """
    spec = resolve(model)
    text = spec.text_config
    fingerprint: dict[str, Any] = {
        "format": FINGERPRINT_FORMAT,
        "model_type": spec.model_type,
        "architecture": {
            "num_layers": spec.num_layers,
            "hidden_size": text.hidden_size,
            "vocab_size": getattr(text, "vocab_size", None),
        },
        "weights": weights_digest(spec.model),
    }
    if processor is not None:
        fingerprint["tokenizer"] = tokenizer_digest(processor)
    fingerprint["dyvte"] = __version__
    return fingerprint


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The fields of ``saved`` that differ from ``current``, one message each (``[]``: the same model).

    ``weights`` match when any precision both hold agrees; ``tokenizer`` is compared only when both hold one;
    ``dyvte`` (the writer's version) is never compared.
    """
    differences = []
    if saved.get("model_type") != current.get("model_type"):
        differences.append(f"model_type {saved.get('model_type')!r}, this model {current.get('model_type')!r}")
    ours, theirs = saved.get("architecture") or {}, current.get("architecture") or {}
    for key in sorted(set(ours) & set(theirs)):
        if ours[key] != theirs[key]:
            differences.append(f"architecture.{key} {ours[key]!r}, this model {theirs[key]!r}")
    ours, theirs = saved.get("weights"), current.get("weights")
    if isinstance(ours, dict) and isinstance(theirs, dict):
        common = [k for k in ROUNDINGS if k in ours and k in theirs]
        if not any(ours[k] == theirs[k] for k in common):
            shown = common[0] if common else None
            saw = f"sha256 {ours.get(shown)}, this model {theirs.get(shown)}" if shown else "no common precision"
            differences.append(f"weights differ (a sample of every parameter tensor, {shown}: {saw})")
    elif ours != theirs:
        differences.append(f"weights {ours!r}, this model {theirs!r}")
    if "tokenizer" in saved and "tokenizer" in current and saved["tokenizer"] != current["tokenizer"]:
        differences.append(
            f"tokenizer differs (vocabulary, chat template or prompt_template: sha256 {saved['tokenizer']}, "
            f"this model's processor {current['tokenizer']})"
        )
    return differences


def check_fingerprint(
    saved: dict[str, Any] | None,
    model: nn.Module,
    processor: Any = None,
    *,
    what: str,
    allow_other_model: bool = False,
    logged: set[str] | None = None,
) -> None:
    """Refuse ``model`` unless it is the model ``saved`` was taken from.

    Args:
        saved: the fingerprint saved with the file (``None``: a file written before fingerprints; accepted with a
            warning that the model cannot be checked).
        model: the model the file is about to be used on.
        processor: its processor, to compare the ``tokenizer`` field too (skipped without one).
        what: names the file in messages, e.g. ``"exit heads checkpoints/demo-exit-heads"``.
        allow_other_model: accept a mismatch, with a warning naming what differs.
        logged: warnings already logged for this file (each is logged once; updated in place).

    Raises:
        ModelMismatchError: a field differs and ``allow_other_model`` is false.
        ValueError: ``saved`` is not a fingerprint.
    """
    logged = set() if logged is None else logged

    def warn(message: str) -> None:
        if message not in logged:
            logged.add(message)
            logger.warning("%s", message)

    if saved is None:
        warn(
            f"{what} carries no model fingerprint (written before dyvte recorded one): whether it was made for "
            "this model cannot be checked"
        )
        return
    if not isinstance(saved, dict) or "weights" not in saved:
        raise ValueError(
            f"{what}: model_fingerprint must be a dict written by dyvte (with 'weights'), got {saved!r:.80}"
        )
    differences = fingerprint_differences(saved, model_fingerprint(model, processor))
    if not differences:
        return
    message = f"{what} was made for another model: " + "; ".join(differences)
    if allow_other_model:
        warn(
            f"{message}. Used anyway (allow_other_model=True): what it promises was measured on the other model "
            "and may not hold on this one"
        )
        return
    raise ModelMismatchError(
        f"{message}. Fit or calibrate again on this model, or pass {OVERRIDE} to use it anyway (its promise was "
        "measured on the other model)"
    )


# ------------------------------------------------------------------------------------------- checkpoint files
#: files that are not the model (written beside it by dyvte or people)
NOT_MODEL_FILES = {"README.md", "training.json"}
#: files up to this size are hashed whole; larger ones (weights) by size, head, tail and evenly spaced chunks
WHOLE_FILE_BYTES = 64 << 20
HEAD_BYTES, CHUNK_BYTES, CHUNKS = 1 << 20, 64 << 10, 64


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    hasher = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        if size <= WHOLE_FILE_BYTES:
            for block in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(block)
        else:  # the safetensors header (names, shapes, offsets) is in the head
            middle = size - 2 * HEAD_BYTES
            offsets = [0, size - HEAD_BYTES] + [HEAD_BYTES + i * middle // CHUNKS for i in range(CHUNKS)]
            for offset in offsets:
                handle.seek(offset)
                hasher.update(handle.read(HEAD_BYTES if offset in (0, size - HEAD_BYTES) else CHUNK_BYTES))
    return hasher.hexdigest()[:16]


def files_digest(directory: str | Path, ignore: Iterable[str] = NOT_MODEL_FILES) -> str:
    """sha256 (16 hex digits) of a checkpoint directory's files (names, sizes, contents; files over 64 MiB by their
    head, tail and 64 evenly spaced chunks): what a label cache made from that directory depends on, read without
    loading the model. Hidden files and ``ignore`` (a README, dyvte's ``training.json``) are left out.

    Raises:
        FileNotFoundError: ``directory`` is not a directory.
    """
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    skipped = set(ignore)
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and p.name not in skipped)
    return _digest(json.dumps([[p.name, _file_digest(p)] for p in files]).encode())
