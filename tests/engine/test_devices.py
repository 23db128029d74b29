"""The engine's own tensors: every tensor dyvte creates during a forward without naming a device is a reviewed
host-side value (tests/devices.py says what this proves on a CPU-only machine and what it cannot).

Withdrawal (static, per row, exit heads), FastV and pruning before the LLM (FasterVLM, random) run ``generate`` on a
tiny LLaVA (and a tiny LLaVA-NeXT, whose anyres views pruning locates separately) under
:class:`tests.devices.HostFactoryAudit`. A site not in :data:`HOST_SIDE` fails the test: name its device
(``device=x.device``), or add it here with the reason it belongs on the host.
"""

from __future__ import annotations

import pytest
import torch

import dyvte

from ..devices import HostFactoryAudit
from ..tiny_models import TEMPLATE, make_batch, make_tiny

#: (file, function) -> why the tensor it creates without a device belongs on the host
HOST_SIDE = {
    ("dyvte/engine/withdrawal.py", "_post_forward"): "exit_layers: the host list of exits, a result read back",
    ("dyvte/policies/fastv.py", "kept_tokens"): "visual_after: the host budget per row, a result read back",
    ("dyvte/engine/registry.py", "_views"): "encoder-token index of each image feature: views are ranked on the host",
    ("dyvte/engine/registry.py", "_anyres"): "the same for LLaVA-NeXT's packed views (run through the model's packing)",
    ("dyvte/pruning/scoring.py", "keep_mask"): "one view's token count, for the host-side budget",
    ("dyvte/pruning/scoring.py", "random_scores"): "seeded scores from a CPU generator (the same on every device)",
}

#: one image / two images / text only: ragged, left-padded (tests/engine/test_serving.py)
ROWS = [[(32, 32)], [(48, 32), (32, 32)], []]

MECHANISMS = {
    "static K": lambda model, heads: dyvte.withdraw(model, layer=2),
    "per-row K": lambda model, heads: dyvte.withdraw(model, layer=[1, 2, 4]),
    "exit heads": lambda model, heads: dyvte.withdraw(model, heads=heads, threshold=0.5),
    "fastv": lambda model, heads: dyvte.prune(model, "fastv", layer=2, ratio=0.5),
    "fastervlm": lambda model, heads: dyvte.prune(model, "fastervlm", ratio=0.5),
    "random": lambda model, heads: dyvte.prune(model, "random", ratio=0.5),
    "fastervlm + heads": lambda model, heads: _composed(model, heads),
}


def _composed(model, heads):
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(dyvte.prune(model, "fastervlm", ratio=0.5))
    stack.enter_context(dyvte.withdraw(model, heads=heads, threshold=0.5))
    return stack


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_every_device_less_tensor_dyvte_creates_in_a_forward_is_reviewed_host_side(family):
    model, processor = make_tiny(family)
    processor.chat_template = TEMPLATE
    inputs = dict(make_batch(processor, family, ROWS))
    heads = dyvte.ExitHeads.for_model(model, threshold=0.5)
    seen = {}
    for name, mechanism in MECHANISMS.items():
        audit = HostFactoryAudit()
        with mechanism(model, heads), audit, torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
        seen.update({site: (name, where) for site, where in audit.sites.items()})
    unreviewed = {site: used for site, used in seen.items() if site not in HOST_SIDE}
    assert not unreviewed, f"tensors created on the default device in a forward (name their device): {unreviewed}"
    assert ("dyvte/engine/withdrawal.py", "_post_forward") in seen  # the audit does see dyvte's calls


def test_the_audit_records_dyvte_device_less_tensors_only():
    """The audit itself: dyvte's ``exit_logit(0.5)`` (``torch.as_tensor`` of a float) is recorded; ``pack_right``,
    which names its devices, and the test's own ``torch.arange`` are not."""
    from dyvte.engine.layout import pack_right
    from dyvte.policies.exit_heads import exit_logit

    audit = HostFactoryAudit()
    with audit:
        exit_logit(0.5)
        pack_right(torch.ones(2, 5, dtype=torch.bool))
        torch.arange(3)
    assert set(audit.sites) == {("dyvte/policies/exit_heads.py", "exit_logit")}
