"""Prompts for any model: the processor's chat template, or a ``prompt_template`` format string, and BOS checks.

A model saved without a chat template (many LLaVA-architecture checkpoints) cannot format a prompt through
``apply_chat_template``. ``prompt_template`` is a Python format string with one ``{question}`` field, written
exactly as the model was trained, image placeholder included, e.g. ``"USER: <image>\\n{question} ASSISTANT:"``
(LLaVA-1.5). It is used whenever it is given (it wins over a chat template) and is the only way when the processor
has none. A launcher passes it as ``--prompt_template`` (``--data.source.prompt_template`` for ``train/fit.py``);
:func:`attach_prompt_template` stores it on a processor so that every later :func:`dyvte.data.records.build_inputs` call
uses it.

Earlier turns of a conversation (``context``: ``[(question, answer), ...]``) are rendered before the current
question: through the chat template as alternating user / assistant messages (the image in the first user turn),
or with ``prompt_template`` as ``template(q1) + " " + a1 + eos`` then ``turn(q2) + ...``, where ``turn`` is the
template without a leading BOS and without its image placeholder (and the newline or space after it): the image
and the BOS appear once.

Special text in a question: a question (or an earlier turn) that contains the text of one of the model's special
tokens (the image placeholder ``<image>``, a video placeholder, BOS / EOS, chat markers) would be read by the tokenizer
as that token, not as text: an extra ``<image>`` breaks the processor's placeholder count deep inside transformers.
:func:`check_special_text` refuses such a record with its index and the token, before any model work (dyvte does not
rewrite questions: remove the marker; dyvte places the image itself).

Doubled BOS: a template that writes ``{{ bos_token }}`` (or a ``prompt_template`` that starts with ``<s>``) on a
tokenizer that adds its own BOS gives ``[bos, bos, ...]``, a prompt the model never saw in training.
:func:`check_single_bos` refuses it with a message that says which of the two to drop.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Sequence
from typing import Any

import torch

from dyvte.data.errors import DataError
from dyvte.engine.compat import chat_template, image_token

__all__ = [
    "PROMPT_TEMPLATE_ATTR",
    "attach_prompt_template",
    "check_prompt_template",
    "check_single_bos",
    "check_special_text",
    "render_prompt",
    "special_texts",
]

#: attribute under which :func:`attach_prompt_template` keeps the template on a processor (not saved with it)
PROMPT_TEMPLATE_ATTR = "dyvte_prompt_template"
#: the option that sets the template, named in every message
OPTION = "prompt_template (--prompt_template; train/fit.py: --data.source.prompt_template)"
EXAMPLE = "USER: <image>\\n{question} ASSISTANT:"


def check_prompt_template(template: str, processor: Any = None) -> str:
    """Return ``template`` after checking that it formats with ``{question}`` and nothing else.

    Args:
        template: the format string.
        processor: when given, the template must contain the processor's image placeholder exactly once (if the
            processor names one), so that every prompt carries its image.

    Raises:
        ValueError: not a string, no ``{question}`` field, another field, a malformed format string, or (with a
            processor) not exactly one image placeholder. The message names the option and shows an example.
    """
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"{OPTION} must be a non-empty format string such as '{EXAMPLE}', got {template!r}")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise ValueError(f"{OPTION} {template!r} is not a valid format string ({error})") from None
    if fields.count("question") != 1 or set(fields) != {"question"}:
        raise ValueError(
            f"{OPTION} {template!r} must contain the field {{question}} exactly once and no other field (got "
            f"{fields}); e.g. '{EXAMPLE}'"
        )
    token = image_token(processor) if processor is not None else None
    if token is not None and template.count(token) != 1:
        raise ValueError(
            f"{OPTION} {template!r} must contain this model's image placeholder {token!r} exactly once (it has "
            f"{template.count(token)}); e.g. '{EXAMPLE.replace('<image>', token)}'"
        )
    return template


def special_texts(processor: Any) -> tuple[str, ...]:
    """The texts a question may not contain: the processor's placeholder tokens (its string attributes named
    ``*_token``, e.g. ``image_token``, ``video_token``, ``boi_token``) and the tokenizer's special tokens (BOS, EOS,
    pad, unknown, added special tokens). Longest first; empty or blank ones left out."""
    texts = {image_token(processor)}
    attributes = getattr(processor, "__dict__", {})
    texts.update(value for name, value in attributes.items() if name.endswith("_token") and isinstance(value, str))
    tokenizer = getattr(processor, "tokenizer", None)
    texts.update(getattr(tokenizer, "all_special_tokens", None) or ())
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts.update(token.content for token in decoder.values() if getattr(token, "special", False))
    return tuple(sorted((t for t in texts if isinstance(t, str) and t.strip()), key=lambda t: (-len(t), t)))


@functools.lru_cache(maxsize=8)
def _special_pattern(specials: tuple[str, ...]) -> re.Pattern:
    """One regular expression for all the special texts, longest first (one scan of a question finds any)."""
    return re.compile("|".join(re.escape(token) for token in sorted(specials, key=len, reverse=True)))


def check_special_text(text: Any, where: str, specials: Sequence[str]) -> None:
    """Refuse a question or answer that contains the text of a special token (see :func:`special_texts`).

    Args:
        text: the question (or an earlier turn's question / answer); non-strings are left to the other checks.
        where: the record, for the message (e.g. ``"record 3"``).
        specials: :func:`special_texts` of the processor.

    Raises:
        DataError: naming the record and the token.
    """
    if not isinstance(text, str) or not specials:
        return
    found = _special_pattern(tuple(specials)).search(text)
    if found is not None:
        found = found.group(0)
        raise DataError(
            f"{where}: {text!r:.120} contains {found!r}, the text of one of this model's special tokens (an image "
            "or video placeholder, BOS/EOS, a chat marker): the tokenizer would read it as that token, not as text "
            "(an extra image placeholder breaks the processor's placeholder count); remove it from the record (dyvte "
            "places the image itself)"
        )


def attach_prompt_template(processor: Any, template: str | None) -> Any:
    """Make every later :func:`dyvte.data.records.build_inputs` call on ``processor`` use ``template`` (``None``:
    no-op).

    Returns:
        ``processor`` itself (the template is kept as an attribute; ``save_pretrained`` does not save it).
    """
    if template is not None:
        setattr(processor, PROMPT_TEMPLATE_ATTR, check_prompt_template(template, processor))
    return processor


def _turn_template(template: str, token: str | None, bos: str | None) -> str:
    """The template for a later turn: a leading BOS, the image placeholder and the whitespace after it removed."""
    if bos and template.startswith(bos):
        template = template[len(bos) :]
    if token is None:
        return template
    return re.sub(re.escape(token) + r"[ \t]*\n?", "", template, count=1)


def render_prompt(
    processor: Any,
    question: str,
    context: Sequence[tuple[str, str]] | None = None,
    template: str | None = None,
) -> str:
    """The prompt text of one record (image placeholder not yet expanded), ending where the answer starts.

    Args:
        processor: the model's processor.
        question: the current question (without any image marker).
        context: earlier ``(question, answer)`` turns of the same conversation, oldest first.
        template: a ``prompt_template``; default: the one attached to the processor, else its chat template.

    Raises:
        DataError: the processor has no chat template and no template was given (the message names the option).
    """
    template = template if template is not None else getattr(processor, PROMPT_TEMPLATE_ATTR, None)
    turns = [*(context or ()), (question, None)]
    if template is not None:
        tokenizer = processor.tokenizer
        later = _turn_template(template, image_token(processor), getattr(tokenizer, "bos_token", None))
        eos = getattr(tokenizer, "eos_token", None) or ""
        parts = []
        for i, (q, a) in enumerate(turns):
            parts.append((template if i == 0 else later).format(question=q))
            if a is not None:
                parts.append(f" {a}{eos}")
        return "".join(parts)
    if chat_template(processor) is None:
        token = image_token(processor) or "<image>"
        raise DataError(
            f"this model's processor has no chat template, so dyvte cannot format its prompts: pass {OPTION}, a "
            f"format string with {{question}} and the image placeholder {token!r} written as the model was trained, "
            f"e.g. '{EXAMPLE.replace('<image>', token)}' for LLaVA-1.5"
        )
    messages: list[dict] = []
    for i, (q, a) in enumerate(turns):
        content = [{"type": "text", "text": q}]
        if i == 0:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user", "content": content})
        if a is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def check_single_bos(
    processor: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, offset: int = 0, template: str | None = None
) -> None:
    """Refuse prompts whose first two tokens are both the BOS token.

    Args:
        processor: the model's processor (its tokenizer gives the BOS id).
        input_ids: ``(B, T)`` the processor's left-padded ids.
        attention_mask: ``(B, T)`` 1 on real tokens.
        offset: index of the first row's record (for the message).
        template: the ``prompt_template`` the prompts were made with, if any (for the message).

    Raises:
        DataError: naming the first such record, the token and both sources of BOS.
    """
    tokenizer = processor.tokenizer
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or input_ids is None:
        return
    for b in range(input_ids.shape[0]):
        row = input_ids[b][attention_mask[b].bool()]  # (T_b,)
        if row.numel() >= 2 and int(row[0]) == bos and int(row[1]) == bos:
            template = template if template is not None else getattr(processor, PROMPT_TEMPLATE_ATTR, None)
            source = f"the prompt_template {template!r}" if template is not None else "the chat template"
            raise DataError(
                f"record {offset + b}: the prompt starts with two BOS tokens ({tokenizer.bos_token!r}, id {bos}): "
                f"{source} writes one and the tokenizer adds its own. Remove the BOS from {source} (e.g. the "
                "leading '{{ bos_token }}' of a chat template) or pass a prompt_template without it: a doubled BOS "
                "is a prompt the model never saw in training"
            )
