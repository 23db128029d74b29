"""DyVTE labels (dyvte.exits.labels): is withdrawal at K safe for a sample, and the label cache heads train on.

The rule on hand-built tensors (argmax agreement and the loss ratio) and the smallest safe layer; a label cache's
``match`` / ``correct`` columns are exactly what greedy generation under withdrawal at K writes, and its ``dyvte``
column and features what the on-the-fly labels compute; a model in training mode is labelled in eval mode.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

import dyvte
from dyvte.data.prompts import attach_prompt_template
from dyvte.data.records import build_inputs
from dyvte.engine.compat import ENCODER_METHODS
from dyvte.engine.registry import resolve
from dyvte.engine.withdrawal import active_withdrawal
from dyvte.exits.branching import Branches
from dyvte.exits.labels import (
    answer_loss,
    build_label_cache,
    exit_safe,
    label_batch,
    on_the_fly_labels,
    smallest_safe_layer,
)
from dyvte.policies.exit_heads import first_exit, head_inputs

from ..families import MODEL_TYPES
from ..families import family as family_of
from ..tiny_models import TEMPLATE, WORDS, make_batch, make_tiny, records, sharpened_heads


@pytest.fixture(scope="module")
def tiny():
    model, processor = make_tiny("llava")
    processor.chat_template = TEMPLATE
    return model, processor


def _flags(model: torch.nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def one_hot_logits(tokens: list[list[int]], vocab: int = 5, scale: float = 4.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(tokens), vocab).float() * scale


def test_exit_rule_on_hand_built_tensors():
    labels = torch.tensor([[-100, -100, 2, 3], [-100, -100, -100, 1]])  # answers: [2, 3] and [1]
    full = one_hot_logits([[0, 2, 3, 0], [0, 0, 1, 0]])  # predicts the answers at positions 1, 2 and 2
    same = full.clone()
    one_wrong = one_hot_logits([[0, 2, 4, 0], [0, 0, 1, 0]])  # row 0: 1 of 2 answer tokens differ
    assert exit_safe(full, same, labels).tolist() == [True, True]  # identical: safe even at the same loss
    assert exit_safe(full, one_wrong, labels).tolist() == [False, True]
    assert exit_safe(full, one_wrong, labels, agree=0.49).tolist() == [False, True]  # loss rose far above 1.03x
    softer = full.clone()
    softer[1, 2, 1] = 3.9  # same argmax, loss a little higher
    ratio = (answer_loss(softer, labels) / answer_loss(full, labels))[1].item()
    assert ratio > 1.03
    assert exit_safe(full, softer, labels).tolist() == [True, False]
    assert exit_safe(full, softer, labels, loss_ratio=ratio + 1e-3).tolist() == [True, True]
    with pytest.raises(ValueError, match="answer token"):
        exit_safe(full, same, torch.full_like(labels, -100))


def test_smallest_safe_layer():
    safe = torch.tensor([[False, True, True, True], [True, False, True, True], [True] * 4, [False] * 4])
    assert smallest_safe_layer(safe).tolist() == [1, 2, 0, 4]


def _greedy(model, inputs, eos: int, new_tokens: int) -> list[list[int]]:
    """Each row's greedy answer ids up to and including the first end token (``new_tokens`` at most)."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    out = out[:, inputs["input_ids"].shape[1] :]
    rows = []
    for row in out.tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def test_cached_labels_equal_generation_under_withdrawal_and_on_the_fly_labels(tiny):
    model, processor = tiny
    recs = records(5)
    for i, rec in enumerate(recs):  # answers the full model gives, so that some layers are safe
        inputs = build_inputs(processor, [rec])
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
        rec["answer"] = processor.tokenizer.decode(out[0, -1:]) if i % 2 == 0 else rec["answer"]
    cache = build_label_cache(model, processor, recs, batch_size=2, max_new_tokens=2, progress=False)
    cache = cache.with_format("torch")[:]  # 2-token answers: a random model's longer ones never survive withdrawal
    assert cache["features"].shape == (5, 3, 128) and cache["match"].shape == (5, 4)
    assert cache["correct"].shape == (5, 5)
    eos = processor.tokenizer.eos_token_id
    prompt = build_inputs(processor, recs)
    gold = build_inputs(processor, recs, with_answers=True)["labels"]
    gold = [row[row != -100].tolist() for row in gold]
    full = _greedy(model, prompt, eos, 2)
    assert cache["correct"][:, 4].tolist() == [f == g for f, g in zip(full, gold, strict=True)]
    for layer in range(4):  # match / correct: exactly what greedy generation under withdrawal at K writes
        with dyvte.withdraw(model, layer=layer):
            answers = _greedy(model, prompt, eos, 2)
        assert cache["match"][:, layer].tolist() == [a == f for a, f in zip(answers, full, strict=True)], layer
        assert cache["correct"][:, layer].tolist() == [a == g for a, g in zip(answers, gold, strict=True)], layer
    assert not cache["match"].all() and cache["match"].any()  # both outcomes occur: the comparison can fail
    inputs = build_inputs(processor, recs, with_answers=True)
    labels = inputs["labels"]
    with torch.no_grad():
        full_logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    for layer in (1, 2, 3):  # the paper's rule and the head inputs: as the on-the-fly labels compute them
        feats, fly = on_the_fly_labels(model, inputs, layer)
        assert fly.tolist() == cache["dyvte"][:, layer].tolist()
        torch.testing.assert_close(feats, cache["features"][:, layer - 1], atol=1e-5, rtol=1e-5)
        with dyvte.withdraw(model, layer=layer) as handle, torch.no_grad():
            withdrawn = handle.to_input_positions(model(**{k: v for k, v in inputs.items() if k != "labels"}).logits)
        assert exit_safe(full_logits, withdrawn, labels).tolist() == cache["dyvte"][:, layer].tolist()
    with pytest.raises(ValueError, match="exit layer"):
        on_the_fly_labels(model, inputs, 0)


def test_visual_label_columns_are_what_visual_heads_read_at_run_time(tiny):
    """A label cache with ``visual_inputs`` keeps every column of the plain one, plus ``visual_features``: the
    visual tokens' pooled states after each layer. Heads that read them exit at run time (a batch of prompts under
    ``withdraw``) exactly where the cache's head inputs say, the inputs they are trained and certified on."""
    model, processor = tiny
    recs = records(6)
    options = {"batch_size": 4, "max_new_tokens": 2, "progress": False}
    plain = build_label_cache(model, processor, recs, **options)
    cache = build_label_cache(model, processor, recs, **options, visual_inputs=True)
    plain, cache = plain.with_format("numpy")[:], cache.with_format("numpy")[:]
    assert set(cache) == set(plain) | {"visual_features"}
    for key in plain:
        np.testing.assert_array_equal(cache[key], plain[key], err_msg=key)
    assert cache["visual_features"].shape == (6, 3, 128)
    heads = sharpened_heads(model, seed=4, visual_inputs=True)
    inputs = head_inputs(cache, visual_inputs=True)  # (N, L-1, 4d)
    assert inputs.shape == (6, 3, 256)
    with torch.no_grad():
        offline = first_exit(heads(inputs), heads.exit_logits()).tolist()
    assert len(set(offline)) > 1, offline  # rows leave at different layers
    with dyvte.withdraw(model, heads=heads) as handle, torch.no_grad():
        model(**build_inputs(processor, recs))
        assert handle.exit_layers.tolist() == offline
    with pytest.raises(ValueError, match="no visual_features column: label with --data.labels.visual_inputs true"):
        head_inputs(plain, visual_inputs=True)


def test_labels_of_a_model_in_training_mode_are_the_eval_mode_labels(dropout_model, caplog):
    model, processor = dropout_model
    recs = records(4)
    inputs = build_inputs(processor, recs, with_answers=True)
    reference = build_label_cache(model, processor, recs, batch_size=2, progress=False).with_format("torch")[:]
    fly_reference = on_the_fly_labels(model, inputs, 2)
    model.train()
    flags = _flags(model)
    with caplog.at_level(logging.WARNING, logger="dyvte.utils.modes"):
        got = build_label_cache(model, processor, recs, batch_size=2, progress=False).with_format("torch")[:]
        fly = on_the_fly_labels(model, inputs, 2)
    assert "build_label_cache (labelling): the model was in training mode" in caplog.text
    assert "on_the_fly_labels (labelling): the model was in training mode" in caplog.text
    assert torch.allclose(got["features"], reference["features"], atol=1e-6)
    for column in ("match", "correct", "dyvte"):
        assert torch.equal(got[column], reference[column]), column
    assert torch.allclose(got["kl"], reference["kl"], atol=1e-6)
    assert torch.allclose(fly[0], fly_reference[0], atol=1e-6) and torch.equal(fly[1], fly_reference[1])
    assert _flags(model) == flags


# ------------------------------------------------------------------------------------------ labels by branching
ROWS = [[(32, 32)], [(48, 32), (32, 32)], []]  # ragged, left-padded: one image / two images / text only


@pytest.fixture(scope="module", params=MODEL_TYPES)
def family_model(request):
    model, processor = make_tiny(request.param)
    return request.param, model, processor


def _old_withdrawn(model, inputs: dict, layer: int) -> torch.Tensor:
    """The withdrawn logits at the input positions, the whole model run under withdrawal at ``layer``."""
    with dyvte.withdraw(model, layer=layer) as handle, torch.no_grad():
        return handle.to_input_positions(model(**inputs).logits)


def _untouched(model) -> None:
    """No wrapped forward, encoder method or withdrawal left on ``model``."""
    spec = resolve(model)
    assert all("forward" not in vars(layer) for layer in spec.layers)
    assert not any(name in vars(model.base_model) for name in ENCODER_METHODS)
    assert active_withdrawal(model) is None


def test_branches_equal_whole_withdrawn_forwards_on_a_ragged_batch(family_model):
    """Every family (DeepStack, linear attention included): the full forward and withdrawal at every K replaying
    layers 0..K-1 equal the whole model run once per K, on rows with different image counts; the vision encoder
    runs once."""
    family, model, processor = family_model
    inputs = dict(make_batch(processor, family, ROWS))
    with torch.no_grad():
        reference = model(**inputs).logits
        old = [_old_withdrawn(model, inputs, layer) for layer in range(resolve(model).num_layers)]
        with Branches(model) as branches:
            full = branches.full(inputs, output_hidden_states=True)
            assert torch.equal(full.logits, reference)
            for layer, expected in enumerate(old):
                assert torch.equal(branches.withdrawn(layer), expected), layer
                assert torch.equal(branches.withdrawn(layer, last=5), expected[:, -5:]), layer
                _untouched_layers(model)
            memo = branches.encoder_memo
            assert memo.calls == memo.hits + 1 and memo.hits == 2 * len(old)  # the encoder ran in the full forward
    _untouched(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)


def _untouched_layers(model) -> None:
    assert all("forward" not in vars(layer) for layer in resolve(model).layers)


def test_branched_labels_equal_the_labels_of_whole_withdrawn_forwards(family_model):
    """Every family: label_batch's columns by branching equal those of one whole withdrawn forward per K (greedy
    answers that differ from the gold ones add gold-forced rows: the batch is ragged in length and rows)."""
    family, model, processor = family_model
    processor = copy.copy(processor)
    prompt_image = family_of(family).prompt_image
    if getattr(processor, "video_processor", ...) is None:  # SmolVLM's chat template needs its video processor
        attach_prompt_template(processor, f"{prompt_image} {{question}} {WORDS[0]}")
    else:
        processor.chat_template = TEMPLATE.replace("<image>", prompt_image)
    recs = records(3)
    generation = model.generation_config
    model.generation_config = copy.deepcopy(generation)  # a random model may answer with visual placeholders
    model.generation_config.suppress_tokens = resolve(model).visual_ids.tolist()
    try:
        with torch.no_grad():
            branched = label_batch(model, processor, recs, max_new_tokens=2)
            old = label_batch(model, processor, recs, max_new_tokens=2, branch=False)
    finally:
        model.generation_config = generation
    _untouched(model)
    assert branched.keys() == old.keys()
    for column in ("features", "extras", "match", "correct", "dyvte", "tokens", "visual"):
        np.testing.assert_array_equal(branched[column], old[column], err_msg=column)
    np.testing.assert_allclose(branched["kl"], old["kl"], rtol=1e-5, atol=1e-6)
    linear = resolve(model).linear_attention  # no attention mass on a linear-attention layer (Qwen3.5): nan
    for j in range(resolve(model).num_layers - 1):
        if linear and linear[j + 1]:
            assert np.isnan(branched["extras"][:, j, 2]).all(), j


class _Boom(RuntimeError):
    pass


def test_branches_restore_the_model_after_an_error_and_refuse_misuse(tiny):
    model, processor = tiny
    inputs = dict(make_batch(processor, "llava", ROWS))
    spec = resolve(model)
    with torch.no_grad():
        reference = model(**inputs).logits
    raise_at: list[int | None] = [None]

    def hook(module, args):
        if raise_at[0] is not None:
            raise _Boom("mid-way")

    handle = spec.layers[2].register_forward_pre_hook(hook)
    try:
        with pytest.raises(_Boom), Branches(model) as branches, torch.no_grad():
            raise_at[0] = 2
            branches.full(inputs)  # fails in layer 2: the recording forwards are undone
        _untouched(model)
        with pytest.raises(_Boom), Branches(model) as branches, torch.no_grad():
            raise_at[0] = None
            branches.full(inputs)
            raise_at[0] = 2
            try:
                branches.withdrawn(3)  # layers 0..2 replayed; layer 2's hook still runs, and fails
            finally:
                _untouched_layers(model)
                assert active_withdrawal(model) is None
                assert "get_image_features" in vars(model.base_model)  # the memo lives until the block ends
        _untouched(model)
    finally:
        handle.remove()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)
    with Branches(model) as branches:
        with pytest.raises(RuntimeError, match="call Branches.full first"):
            branches.withdrawn(0)
        with torch.no_grad():
            branches.full(inputs)
        for bad in (-1, spec.num_layers, 1.0, True):
            with pytest.raises(ValueError, match=r"exit layer must be an int in \[0, 3\]"):
                branches.withdrawn(bad)
        width = inputs["input_ids"].shape[1]
        for bad in (0, width + 1, 2.0):
            with pytest.raises(ValueError, match=rf"last must be an int in \[1, {width}\]"):
                branches.withdrawn(1, last=bad)
    with pytest.raises(RuntimeError, match="inside a `with` block"):
        Branches(model).full(inputs)
    _untouched(model)


def test_only_rows_whose_greedy_answer_is_not_the_gold_one_are_decoded():
    """Rows whose gold answer the full model writes greedily (the demo model's right answers) are labelled from the
    gold forcing alone: ``generate`` sees only the others; a generation config whose logits processors may change
    the argmax (a repetition penalty) sends every row through it. The labels are the same either way."""
    from dyvte.demo import load_demo_dataset, load_demo_model, load_demo_processor

    model, processor = load_demo_model().eval(), load_demo_processor()
    data = load_demo_dataset("validation")
    recs = [data[i] for i in range(12)]
    recs[0] = {**recs[0], "answer": "none" if recs[0]["answer"] != "none" else "7"}  # a wrong gold answer
    decoded: list[int] = []
    generate = model.generate

    def counting(**kwargs):
        decoded.append(int(kwargs["input_ids"].shape[0]))
        return generate(**kwargs)

    model.generate = counting
    try:
        with torch.no_grad():
            shortcut = label_batch(model, processor, recs)
            right = int(shortcut["correct"][:, -1].sum())
            assert not shortcut["correct"][0, -1] and 0 < right < len(recs)
            assert decoded == [len(recs) - right]  # only the rows whose greedy answer is not the gold one
            model.generation_config.repetition_penalty = 1.0 + 1e-6  # a processor, (almost) no change to the argmax
            everything = label_batch(model, processor, recs)
            assert decoded == [len(recs) - right, len(recs)]
    finally:
        del model.generate
    for column in ("features", "match", "correct", "dyvte", "tokens", "visual"):
        np.testing.assert_array_equal(shortcut[column], everything[column], err_msg=column)
    np.testing.assert_allclose(shortcut["kl"], everything["kl"], rtol=1e-4, atol=1e-5)
