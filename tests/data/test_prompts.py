"""Prompts for any model: prompt_template, the missing-chat-template error, doubled BOS, earlier turns."""

from __future__ import annotations

import copy

import pytest
import torch
from tokenizers import processors

from dyvte.data.prompts import attach_prompt_template, check_prompt_template, render_prompt
from dyvte.data.records import DataError, build_inputs
from dyvte.demo import load_demo_dataset, load_demo_processor

from ..tiny_models import make_tiny, records

#: the demo chat template's prompt, written as a format string
DEMO_TEMPLATE = "<s>USER: <image> {question} ASSISTANT:"


@pytest.fixture(scope="module")
def demo():
    return load_demo_processor(), list(load_demo_dataset("validation").select(range(4)))


def test_prompt_template_gives_the_chat_templates_inputs(demo):
    processor, recs = demo
    chat = build_inputs(processor, recs, with_answers=True)
    formatted = build_inputs(processor, recs, with_answers=True, prompt_template=DEMO_TEMPLATE)
    assert chat.keys() == formatted.keys()
    for key in chat:
        assert torch.equal(chat[key], formatted[key]), key
    attached = attach_prompt_template(copy.deepcopy(processor), DEMO_TEMPLATE)
    attached.chat_template = None  # the attached template is used, the (absent) chat template never read
    assert torch.equal(build_inputs(attached, recs)["input_ids"], build_inputs(processor, recs)["input_ids"])


def test_a_model_without_chat_template_names_the_option():
    _, processor = make_tiny("llava")  # no chat template
    assert getattr(processor, "chat_template", None) is None
    with pytest.raises(DataError, match=r"no chat template.*prompt_template.*--prompt_template.*'USER: <image>"):
        build_inputs(processor, records(2))
    inputs = build_inputs(processor, records(2), prompt_template="USER: <image>\n{question} ASSISTANT:")
    ids = inputs["input_ids"][inputs["attention_mask"].bool()]
    assert int((ids == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 2 * 16  # 16 per image


def test_a_doubled_bos_is_refused_naming_both_sources():
    _, processor = make_tiny("llava")  # its tokenizer adds <s> itself
    bos = processor.tokenizer.bos_token_id
    processor.chat_template = "{{ bos_token }}" + (
        "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}"
        "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
    )
    with pytest.raises(DataError, match=r"record 3: the prompt starts with two BOS tokens .*chat template.*bos_token"):
        build_inputs(processor, records(2), offset=3)
    with pytest.raises(DataError, match=r"two BOS tokens .*the prompt_template '<s>USER"):
        build_inputs(processor, records(2), prompt_template="<s>USER: <image> {question} ASSISTANT:")
    good = build_inputs(processor, records(2), prompt_template="USER: <image> {question} ASSISTANT:")
    first = good["input_ids"][good["attention_mask"].bool()].view(-1)
    assert int(first[0]) == bos and int((good["input_ids"] == bos).sum()) == 2  # one BOS per row, from the tokenizer


def test_the_demo_template_on_a_tokenizer_that_adds_bos_is_refused(demo):
    processor, recs = demo
    processor = copy.deepcopy(processor)
    backend = processor.tokenizer.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    with pytest.raises(DataError, match=r"record 0: the prompt starts with two BOS tokens \('<s>', id 1\)"):
        build_inputs(processor, recs)


@pytest.mark.parametrize(
    "template, match",
    [
        ("USER: <image> ASSISTANT:", r"\{question\} exactly once"),
        ("USER: <image> {question} {answer}", r"no other field"),
        ("USER: {question} ASSISTANT:", r"image placeholder '<image>' exactly once \(it has 0\)"),
        ("USER: <image> {question ASSISTANT:", r"not a valid format string"),
        ("", r"non-empty format string"),
    ],
)
def test_bad_prompt_templates_are_named(demo, template, match):
    with pytest.raises(ValueError, match=r"prompt_template.*" + match if template else match):
        check_prompt_template(template, demo[0])


def test_earlier_turns_render_the_same_through_either_template(demo):
    processor, recs = demo
    context = [("how many digits", "3"), ("is there a 7", "no")]
    chat = render_prompt(processor, "sum of row 1", context)
    formatted = render_prompt(processor, "sum of row 1", context, DEMO_TEMPLATE)
    assert chat.count("<image>") == formatted.count("<image>") == 1 and formatted.count("<s>") == 1
    tok = processor.tokenizer
    assert tok(chat)["input_ids"] == tok(formatted)["input_ids"]
    with_context = build_inputs(processor, [{**recs[0], "context": [{"question": q, "answer": a} for q, a in context]}])
    assert with_context["input_ids"].shape[1] > build_inputs(processor, recs[:1])["input_ids"].shape[1]
