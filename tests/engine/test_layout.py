"""Pure layout functions on hand-built tensors."""

import torch

from dyvte.engine.layout import compose, pack_right, slot_mask, take


def test_pack_right_keeps_order_and_left_pads():
    keep = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
    assert pack_right(keep).tolist() == [[0, 2, 3], [-1, -1, 2]]


def test_compose_maps_tokens_to_earlier_slots():
    outer = torch.tensor([[0, 2, 3], [-1, 1, 2]])  # slots of an earlier layout over 4 tokens
    inner = torch.tensor([[2, 3], [-1, 2]])
    assert compose(outer, inner, 4).tolist() == [[1, 2], [-1, 2]]
    assert compose(None, inner, 4).tolist() == inner.tolist()


def test_take_broadcasts_batch_and_gathers_tokens():
    x = torch.arange(5.0).view(1, 5, 1).expand(1, 5, 2)  # (1, T, d): a rotary table with batch 1
    idx = torch.tensor([[4, 0], [-1, 3]])
    out = take(x, idx, 1)
    assert out.shape == (2, 2, 2)
    assert out[..., 0].tolist() == [[4.0, 0.0], [0.0, 3.0]]  # padding slot reads token 0
    ids = torch.arange(15).view(3, 1, 5)  # Qwen2-VL style (3, B=1, T) position ids
    assert take(ids, idx, -1)[:, 0].tolist() == [[4, 0], [9, 5], [14, 10]]


def test_mask_is_causal_over_original_columns_with_window_and_padding():
    q_cols = torch.tensor([[-1, 2, 5]])
    q_valid = torch.tensor([[False, True, True]])
    k_cols = torch.cat([torch.tensor([[0, 1]]), q_cols], 1)
    k_valid = torch.cat([torch.tensor([[True, False]]), q_valid], 1)
    mask = slot_mask(q_cols, q_valid, k_cols, k_valid, window=None, kind="sdpa", dtype=torch.float32)
    assert mask[0, 0].int().tolist() == [[0, 0, 1, 0, 0], [1, 0, 0, 1, 0], [1, 0, 0, 1, 1]]
    windowed = slot_mask(q_cols, q_valid, k_cols, k_valid, window=4, kind="sdpa", dtype=torch.float32)
    assert windowed[0, 0, 2].int().tolist() == [0, 0, 0, 1, 1]  # 5 - 0 >= 4: column 0 leaves the window
    eager = slot_mask(q_cols, q_valid, k_cols, k_valid, window=None, kind="eager", dtype=torch.float32)
    assert torch.equal(eager == 0, mask)


def test_plain_causal_mask_is_explicit_and_causal():
    """No host read decides to drop the mask (the engine's hot path): a plain causal case is the explicit tril."""
    cols = torch.arange(4)[None]
    ones = torch.ones(1, 4, dtype=torch.bool)
    mask = slot_mask(cols, ones, cols, ones, window=None, kind="sdpa", dtype=torch.float32)
    assert torch.equal(mask[0, 0], torch.ones(4, 4, dtype=torch.bool).tril())
    windowed = slot_mask(cols, ones, cols, ones, window=2, kind="sdpa", dtype=torch.float32)
    assert windowed[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
