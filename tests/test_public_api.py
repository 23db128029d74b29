"""The public API of docs/design.md §3: the exports are exactly the documented ones, the documented calls bind to the
real signatures, and each does what §3 says, on a tiny LLaVA."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

import dyvte
from dyvte.engine.registry import resolve
from dyvte.eval.methods import Method

from .scripts import REPO_ROOT
from .tiny_models import make_batch, make_tiny

ROWS = [[(32, 32)], [(32, 32), (32, 32)], []]


@pytest.fixture(scope="module")
def llava():
    model, processor = make_tiny("llava")
    return model, dict(make_batch(processor, "llava", ROWS))


VIEW = 16  # patches per image of the tiny LLaVA (CLIP 32 px / patch 8)


DESIGN = REPO_ROOT / "docs" / "design.md"


def _design_section_3() -> str:
    """The text of docs/design.md's section 3 (the public API)."""
    return DESIGN.read_text().split("## §3 Public API", 1)[1].split("\n## ", 1)[0]


def test_public_api_of_design_section_3(llava, tmp_path):
    """The exports are exactly the documented ones, the documented calls bind, and they do what §3 says."""
    model, inputs = llava
    num_layers = resolve(model).num_layers
    exports = _design_section_3().split("exports:", 1)[1].split("(`CompatibilityError`", 1)[0]
    assert set(re.findall(r"`(\w+)`", exports)) == set(dyvte.__all__)
    documented_calls = [  # the calls of §3's example, bound against the real signatures
        (dyvte.withdraw, (model,), {"layer": 16}),
        (dyvte.withdraw, (model,), {"layer": [2, 5, 8]}),
        (dyvte.withdraw, (model,), {"calibration": "ckpt/cal"}),
        (dyvte.withdraw, (model,), {"heads": object(), "threshold": 0.8}),
        (dyvte.calibrate, (model, []), {"threshold": 3e-3}),
        (dyvte.ExitHeads.from_pretrained, ("checkpoints/demo-exit-heads",), {}),
        (dyvte.prune, (model, "fastervlm"), {"ratio": 0.75}),
        (dyvte.prune, (model, "random"), {"keep": 64, "seed": 0}),
        (dyvte.prune, (model, "fastv"), {"layer": 2, "ratio": 0.75}),
        (dyvte.prefill_flops, (model.config, 40, 16, 2), {}),
        (dyvte.evaluate, (model, None, [], dyvte.PolicyRun("static", {"layer": 6})), {}),
    ]
    for fn, args, kwargs in documented_calls:
        inspect.signature(fn).bind(*args, **kwargs)  # TypeError if the documented call no longer fits
    assert all(issubclass(getattr(dyvte, m), Method) for m in ("Full", "PolicyRun", "PruningRun", "Compose"))
    assert dyvte.supported_model_types() == sorted(dyvte.REGISTRY) and "llava" in dyvte.REGISTRY

    with dyvte.withdraw(model, layer=[1, 2, num_layers]) as handle, torch.no_grad():  # one exit layer per row
        logits = model(**inputs).logits
    full = handle.to_input_positions(logits, float("nan"))
    assert handle.exit_layers.tolist() == [1, 2, num_layers]
    assert handle.output_positions.shape == logits.shape[:2]
    assert full.shape == (*inputs["input_ids"].shape, logits.shape[-1])
    real = handle.output_positions >= 0
    assert int(full.isnan().all(-1).logical_not().sum()) == int(real.sum())  # NaN fill everywhere else
    assert not model._forward_pre_hooks  # removed on exit

    cal = dyvte.calibrate(model, [inputs], threshold=3e-3, progress=False)
    assert len(cal.kl_per_layer) == num_layers + 1 and 0 <= cal.layer <= num_layers and isinstance(cal.met, bool)
    cal.save(tmp_path / "cal")
    assert (tmp_path / "cal" / "calibration.json").is_file()
    with dyvte.withdraw(model, calibration=str(tmp_path / "cal")) as handle, torch.no_grad():
        model(**inputs)
    assert handle.exit_layers.tolist() == [cal.layer] * len(ROWS)

    heads = dyvte.ExitHeads.for_model(model)
    loaded = dyvte.ExitHeads.from_pretrained(heads.save_pretrained(tmp_path / "heads"))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in heads.state_dict().items())
    with dyvte.withdraw(model, heads=loaded, threshold=1.5) as handle, torch.no_grad():  # > 1: never fires
        model(**inputs)
    assert handle.exit_layers.tolist() == [num_layers] * len(ROWS)

    def kept(n: int) -> int:  # ratio R = 0.75: max(1, floor((1 - R) * n + 0.5)) of n tokens, none of none
        return max(1, int(0.25 * n + 0.5)) if n else 0

    per_image = kept(VIEW)
    with dyvte.prune(model, "fastervlm", ratio=0.75) as pruning, torch.no_grad():
        model(**inputs)
    images = [len(r) for r in ROWS]
    assert pruning.fed_visual.tolist() == [n * per_image for n in images]
    assert [int(k.sum()) for k in pruning.kept_features] == [per_image] * sum(images)
    assert pruning.fed_tokens.tolist() == (pruning.kept_columns >= 0).sum(1).tolist()
    with dyvte.prune(model, "fastv", layer=2, ratio=0.75) as fastv, torch.no_grad():
        model(**inputs)
    assert fastv.visual_after.tolist() == [kept(n * VIEW) for n in images]  # FastV ranks a row's visual tokens
    assert fastv.visual_after.tolist() == fastv.kept_visual.sum(1).tolist()
    assert fastv.scores.shape == inputs["input_ids"].shape

    flops = dyvte.prefill_flops(model.config, 40, 16, 2)
    assert flops.ratio == pytest.approx(flops.flops / flops.full) and flops.convention == "detailed"
