"""Threads under one persistent handle (docs/design.md §4, "Threads"): the handle's per-call state is kept per thread,
so 8 threads calling ``generate`` at once each get exactly what the same inputs give alone (answers and exit layers),
under static withdrawal, learned exits (run-time, mixed exits with grouped execution) and FastV."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

import dyvte
from dyvte.data.records import build_inputs
from dyvte.demo import demo_checkpoint_dir, load_demo_model, load_demo_processor
from dyvte.demo.data import SceneConfig, iter_records, render_scene

THREADS = 8
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def demo():
    model = load_demo_model()
    processor = load_demo_processor()
    processor.tokenizer.padding_side = "left"
    # the demo's first test records, drawn from its deterministic stream; its scenes are made of scikit-learn's
    # digits (the train extra): the inference-only install skips this module, every other CI step runs it
    pytest.importorskip("sklearn", reason="the demo's scenes need scikit-learn's digits (the train extra)")
    cfg, stream = SceneConfig(), iter_records("test", 0, SceneConfig())
    records = [next(stream) for _ in range(2 * THREADS)]
    for record in records:
        record["image"] = Image.fromarray(render_scene(record["sources"], cfg))
    # batches of 1 and 2 rows (ragged: different prompts), one per thread
    batches = [[records[i]] if i % 2 else [records[i], records[i + THREADS]] for i in range(THREADS)]
    return model, [build_inputs(processor, batch) for batch in batches]


def run(model, handle, inputs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    exits = handle.exit_layers
    return out, None if exits is None else exits.clone()


def run_threads(model, handle, batches: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Each batch in its own thread, all released at once by a barrier; returns each thread's result."""
    results: list = [None] * len(batches)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(batches))

    def work(index: int) -> None:
        try:
            barrier.wait(timeout=60)
            for _ in range(2):  # twice: a thread's second prefill restarts its own state only
                results[index] = run(model, handle, batches[index])
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish"
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize(
    "method",
    [
        lambda model: dyvte.withdraw(model, layer=3),
        lambda model: dyvte.withdraw(
            model, heads=dyvte.ExitHeads.from_pretrained(demo_checkpoint_dir("demo-exit-heads")), threshold=0.6
        ),
        lambda model: dyvte.prune(model, method="fastv", layer=2, ratio=0.5),
        lambda model: dyvte.prune(model, method="fastervlm", ratio=0.5),
    ],
    ids=["static", "heads", "fastv", "fastervlm"],
)
def test_threads_equal_alone(demo, method) -> None:
    model, batches = demo
    with method(model) as handle:
        alone = [run(model, handle, inputs) for inputs in batches]
        together = run_threads(model, handle, batches)
    exits = set()
    for (out_alone, exit_alone), (out_thread, exit_thread) in zip(alone, together, strict=True):
        assert torch.equal(out_alone, out_thread)
        if exit_alone is not None:
            assert torch.equal(exit_alone, exit_thread)
            exits.update(exit_alone.tolist())
    if getattr(handle, "layer", 0) is None:  # learned exits: the batches do leave at different layers
        assert len(exits) > 1, exits


def test_thread_exit_layers_are_its_own(demo) -> None:
    """``handle.exit_layers`` after a thread's generate is that thread's last prefill, whatever other threads ran."""
    model, batches = demo
    heads = dyvte.ExitHeads.from_pretrained(demo_checkpoint_dir("demo-exit-heads"))
    with dyvte.withdraw(model, heads=heads, threshold=0.6) as handle:
        run(model, handle, batches[0])
        mine = handle.exit_layers.clone()
        other = threading.Thread(target=run, args=(model, handle, batches[1]))
        other.start()
        other.join(timeout=120)
        assert torch.equal(handle.exit_layers, mine)
