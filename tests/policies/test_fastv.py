def test_fastv_prunes_video_tokens_exactly(tiny):
    family, model, processor = tiny
    check_fastv_equals_masking_oracle(model, encode(processor, family), layer=1, ratio=0.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_needs_a_full_attention_layer_before_k(family):
    model, processor = make_tiny(family, attn="eager", num_layers=8)
    with pytest.raises(dyvte.UnsupportedModelError, match=r"layer 1 .* linear-attention .* K in \[4, 8\]"):
        dyvte.prune(model, "fastv", layer=2, ratio=0.5)
    inputs = dict(make_batch(processor, family, ROWS))
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    assert len(attentions) == 2  # one per full-attention layer (3 and 7): the linear layers have no attention
    reference = attentions[0][:, :, -1].mean(1)  # (B, T): layer 3, the last token, mean over heads
    visual = visual_mask(model, inputs["input_ids"]) & inputs["attention_mask"].bool()
    with dyvte.prune(model, "fastv", layer=4, ratio=0.5) as handle:
        with torch.no_grad():
            model(**inputs)
        torch.testing.assert_close(handle.scores[visual], reference[visual], atol=1e-6, rtol=1e-5)
        assert torch.equal(greedy(model, inputs), greedy(model, inputs, use_cache=False))
