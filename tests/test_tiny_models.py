"""Sanity tests of the tiny model factory in ``tests/tiny_models.py`` (one quick run per family of the table in
``tests/families.py``): forward and generate on a ragged left-padded batch, the table's placeholder counts, rows
equal to unpadded single rows, eager attention equal to SDPA, a save / reload round trip."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from .families import MODEL_TYPES as FAMILIES
from .families import family as entry
from .tiny_models import image_token_id, make_batch, make_tiny, save_and_reload

#: Ragged batch: one image, two images of different sizes, no image, one image of a third size.
ROWS: list[list[tuple[int, int]]] = [[(32, 32)], [(48, 32), (32, 32)], [], [(32, 48)]]


@functools.cache
def _tiny(family: str, attn: str = "sdpa") -> tuple[Any, Any]:
    """Cached tiny model + processor (tests must not modify them)."""
    return make_tiny(family, attn=attn)


def _placeholder_counts(model: Any, batch: Any) -> list[int]:
    return (batch["input_ids"] == image_token_id(model)).sum(dim=1).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_and_generate_on_ragged_left_padded_batch(family: str) -> None:
    model, processor = _tiny(family)
    batch = make_batch(processor, family, ROWS)
    mask = batch["attention_mask"]
    assert mask.shape[0] == len(ROWS)
    assert bool(mask[:, -1].all()), "padding must be on the left"
    assert not bool(mask.all()), "rows must be ragged"
    with torch.no_grad():
        out = model(**batch)
        gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
    length = batch["input_ids"].shape[1]
    assert out.logits.shape[:2] == (len(ROWS), length)
    assert torch.isfinite(out.logits[mask.bool()]).all()
    assert length < gen.shape[1] <= length + 3
    assert torch.equal(gen[:, :length], batch["input_ids"])


@pytest.mark.parametrize("family", FAMILIES)
def test_placeholder_counts_per_row(family: str) -> None:
    model, processor = _tiny(family)
    counts = _placeholder_counts(model, make_batch(processor, family, ROWS))
    assert counts[2] == 0
    assert len({counts[0], counts[1], counts[2]}) == 3, counts
    expected = entry(family).image_tokens
    assert counts[0] == expected[(32, 32)]
    assert counts[3] == expected[(32, 48)]
    if family == "llava_onevision":
        assert counts[1] == 2 * 17  # several images in a row: base features + newline only
    else:
        assert counts[1] == expected[(48, 32)] + expected[(32, 32)]
    if entry(family).dynamic_resolution:
        assert expected[(48, 32)] != expected[(32, 32)]
        for size, n in expected.items():
            assert _placeholder_counts(model, make_batch(processor, family, [[size]])) == [n]


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_match_unpadded_single_rows(family: str) -> None:
    model, processor = _tiny(family)
    batch = make_batch(processor, family, ROWS)
    with torch.no_grad():
        last = model(**batch).logits[:, -1]
        for i, row in enumerate(ROWS):
            single = make_batch(processor, family, [row], row_ids=[i])
            assert int(single["attention_mask"].sum()) == int(batch["attention_mask"][i].sum())
            torch.testing.assert_close(model(**single).logits[0, -1], last[i], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_attention_matches_sdpa(family: str) -> None:
    eager, processor = make_tiny(family, attn="eager")
    sdpa, _ = _tiny(family)
    assert eager.config.text_config._attn_implementation == "eager"
    assert sdpa.config.text_config._attn_implementation == "sdpa"
    batch = make_batch(processor, family, ROWS)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(eager(**batch).logits[mask], sdpa(**batch).logits[mask], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_round_trip(family: str, tmp_path: Any) -> None:
    model, processor = _tiny(family)
    reloaded, reloaded_processor = save_and_reload(model, processor, tmp_path / family)
    batch = make_batch(processor, family, ROWS)
    batch2 = make_batch(reloaded_processor, family, ROWS)
    assert set(batch) == set(batch2)
    for key in batch:
        assert torch.equal(batch[key], batch2[key]), key
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch2).logits)


def test_same_seed_same_weights() -> None:
    a, _ = make_tiny("llava", seed=3)
    b, _ = make_tiny("llava", seed=3)
    c, _ = make_tiny("llava", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_gemma3_sliding_window_binds() -> None:
    model, processor = _tiny("gemma3")
    text = model.config.text_config
    assert {"sliding_attention", "full_attention"} <= set(text.layer_types)
    batch = make_batch(processor, "gemma3", ROWS)
    assert int(batch["attention_mask"].sum(dim=1).min()) > text.sliding_window


def test_num_layers_and_dtype() -> None:
    model, _ = make_tiny("qwen2_vl", num_layers=2, dtype=torch.bfloat16)
    assert model.config.text_config.num_hidden_layers == 2
    assert model.dtype == torch.bfloat16
