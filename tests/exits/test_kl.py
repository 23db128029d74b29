def prompt_batches(processor) -> list[dict]:
    return [dict(make_batch(processor, "llava", [[(32, 32)], [(32, 32)]], seed=s)) for s in range(2)]


def _saved_calibration(model, processor, tmp_path):
    cal = dyvte.calibrate(model, prompt_batches(processor), threshold=1e-2, progress=False)
    cal.save(tmp_path)
    return cal, tmp_path / "calibration.json"


def test_training_mode_model_is_calibrated_in_eval_mode(tmp_path, caplog):
    """Dropout on: KL at K = L is still exactly 0, a warning says so, and the model's mode is restored."""
    model, processor = make_tiny("llava")
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5  # real dropout in training mode
    batches = prompt_batches(processor)
    model.train()
    with torch.no_grad():  # dropout really perturbs this model in training mode
        first, second = (model(**batches[0]).logits for _ in range(2))
    assert not torch.equal(first, second)
    cal = dyvte.calibrate(model, batches, threshold=1e-2, progress=False)
    assert cal.kl_per_layer[cal.num_layers] == 0.0
    assert "training mode" in caplog.text
    assert model.training and all(m.training for m in model.modules())


def test_unknown_positions_value_is_named(llava):
    model, processor, _ = llava
    with pytest.raises(ValueError, match=r"positions must be one of \('first', 'answer'\), got 'last'"):
        dyvte.calibrate(model, prompt_batches(processor), positions="last", progress=False)
