"""Withdrawal-aware LoRA (dyvte.train.lora, train/adapt.py) on a tiny LLaVA saved to disk."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import dyvte
from dyvte.data.records import build_inputs, normalize_answer
from dyvte.data.sources import load_model
from dyvte.eval.methods import Full, PolicyRun
from dyvte.train.lora import (
    AdaptData,
    AdaptModule,
    adapt_loss,
    add_lora,
    compare_sweeps,
    decoder_target_regex,
    draw_exit_layers,
)

from ..oracle import oracle_logits, visual_mask
from ..scripts import REPO_ROOT
from ..tiny_models import TEMPLATE, make_tiny, records

ROOT = REPO_ROOT
NUM_LAYERS = 4


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    """A tiny LLaVA (4 decoder layers) in from_pretrained layout and a JSONL of records with image files."""
    root = tmp_path_factory.mktemp("adapt")
    model, processor = make_tiny("llava", num_layers=NUM_LAYERS)
    processor.chat_template = TEMPLATE
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    lines = []
    for i, rec in enumerate(records(12)):
        rec["image"].save(root / f"img{i}.png")
        lines.append(json.dumps({k: rec[k] for k in ("question", "answer", "qtype")} | {"image": f"img{i}.png"}))
    (root / "records.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _trainer(root: Path, steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root / "runs",
    )


def _is_lora(name: str) -> bool:
    return "lora_" in name


def test_lora_targets_only_the_text_decoder_projections(setup_dir):
    base, _ = load_model(str(setup_dir / "model"))
    regex = decoder_target_regex(base)
    peft_model = add_lora(base, rank=4)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    expected = {
        f"base_model.model.model.language_model.layers.{i}.{part}"
        for i in range(NUM_LAYERS)
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
        + ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }
    assert adapted == expected, regex  # the CLIP tower's q/k/v projections are left alone
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(_is_lora(n) for n in trainable)


def test_draws_are_per_row_or_per_step():
    g = torch.Generator().manual_seed(0)
    rows = draw_exit_layers([1, 2, 4], 64, per_row=True, generator=g)
    assert set(rows.tolist()) == {1, 2, 4}
    step = draw_exit_layers([1, 2, 4], 8, per_row=False, generator=g)
    assert step.shape == (8,) and len(set(step.tolist())) == 1


def test_distillation_is_zero_for_a_fresh_adapter_without_withdrawal(setup_dir):
    base, processor = load_model(str(setup_dir / "model"))
    peft_model = add_lora(base, rank=4)  # lora_B = 0: the adapted model is the base model
    batch = build_inputs(processor, records(3), with_answers=True)
    with torch.no_grad():
        full = adapt_loss(peft_model, batch, torch.full((3,), NUM_LAYERS), distill=1.0)
        plain = peft_model(**batch).loss  # the model's own loss = dyvte's loss when nothing is withdrawn
        withdrawn = adapt_loss(peft_model, batch, torch.tensor([0, 1, 2]), distill=1.0)
    assert float(full["kl"]) < 1e-10
    assert torch.allclose(full["ce"], plain, atol=1e-6)
    assert float(withdrawn["kl"]) > 1e-6


def test_single_records_file_validates_on_held_out_records(setup_dir):
    """One records file: validation records are a seeded held-out part, never training records (was: the first ones)."""
    splits = []
    for _ in range(2):
        data = AdaptData(str(setup_dir / "records.jsonl"), train_samples=None, val_samples=4, batch_size=4, seed=3)
        data.setup()
        splits.append(data.splits)
    train, val = splits[0]["train"], splits[0]["val"]
    assert (len(train), len(val)) == (8, 4)
    train_images = {r["image"].tobytes() for r in train}
    assert not any(r["image"].tobytes() in train_images for r in val)  # disjoint by content
    assert [r["question"] for r in splits[1]["val"]] == [r["question"] for r in val]  # deterministic for a seed


def test_lora_steps_under_withdrawal_change_only_adapter_weights(setup_dir):
    torch.manual_seed(0)
    module = AdaptModule(str(setup_dir / "model"), rank=4, exit_layers=(1, 2, 4), distill=0.5, lr=1e-2, warmup=1)
    data = AdaptData(str(setup_dir / "records.jsonl"), train_samples=8, val_samples=4, batch_size=4)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    _trainer(setup_dir, steps=3).fit(module, datamodule=data)
    after = dict(module.model.named_parameters())
    assert set(after) == set(before)
    frozen = [n for n in before if not _is_lora(n)]
    assert len(frozen) > 0
    for name in frozen:  # the vision tower, projector, embeddings and every base projection: bit for bit
        assert torch.equal(before[name], after[name].detach()), name
    lora_b = [n for n in before if ".lora_B." in n]
    assert all(not torch.equal(before[n], after[n].detach()) for n in lora_b)  # B starts at 0 and moved
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)  # Lightning checkpoints hold the adapter only
    assert set(checkpoint["state_dict"]) == {f"model.{n}" for n in before if _is_lora(n)}


def _launch(root: Path, out: str, extra: tuple[str, ...] = ()) -> None:
    _load_script("adapt").main(
        [
            f"--model.model={root / 'model'}",
            "--model.rank=4",
            "--model.exit_layers=[1,2,4]",
            "--model.lr=0.02",
            "--model.warmup=1",
            f"--data.data={root / 'records.jsonl'}",
            "--data.train_samples=8",
            "--data.val_samples=4",
            "--data.batch_size=4",
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=2",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={root / 'runs'}",
            f"--trainer.logger.init_args.save_dir={root / 'runs'}",
            f"--output_dir={root / out}",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def adapter_dir(setup_dir):
    _launch(setup_dir, "adapter", (f"--merged_dir={setup_dir / 'merged'}",))
    return setup_dir / "adapter"


def test_saved_adapter_holds_only_adapter_keys(adapter_dir, setup_dir):
    saved = set(load_file(adapter_dir / "adapter_model.safetensors"))
    base, _ = load_model(str(setup_dir / "model"))
    peft_model = add_lora(base, rank=4)
    expected = {n.replace(".default", "") for n, p in peft_model.named_parameters() if p.requires_grad}
    assert saved == expected
    assert all(".language_model.layers." in k and _is_lora(k) for k in saved)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(setup_dir / "model")
    summary = json.loads((adapter_dir / "training.json").read_text())
    assert summary["steps"] == 4 and summary["trainable_parameters"] == sum(
        t.numel() for t in load_file(adapter_dir / "adapter_model.safetensors").values()
    )


@pytest.mark.parametrize("layer", range(NUM_LAYERS + 1))
def test_loaded_adapter_under_withdrawal_equals_the_oracle_on_the_merged_model(adapter_dir, setup_dir, layer):
    base, processor = load_model(str(setup_dir / "model"))
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    inputs = build_inputs(processor, records(4, seed=1))
    with torch.no_grad():
        with dyvte.withdraw(peft_model, layer=layer) as handle:
            withdrawn = handle.to_input_positions(peft_model(**inputs).logits)  # (B, T, V)
        unadapted = None
        with peft_model.disable_adapter():
            unadapted = peft_model(**inputs).logits
    merged = peft_model.merge_and_unload()
    reference = oracle_logits(merged, inputs, layer)
    text = ~visual_mask(merged, inputs["input_ids"]) & inputs["attention_mask"].bool()  # kept text positions
    assert (withdrawn[text] - reference[text]).abs().max() < 2e-6
    assert (reference[text] - unadapted[text]).abs().max() > 1e-3  # the adapter is not a no-op


def test_adapter_directory_loads_and_runs_in_the_harness(adapter_dir, setup_dir):
    model, processor = load_model(str(adapter_dir))
    assert isinstance(model, PeftModel)
    recs = records(6, seed=2)
    full = dyvte.evaluate(model, processor, recs, Full(), batch_size=3, max_new_tokens=2, progress=False)
    static = dyvte.evaluate(
        model, processor, recs, PolicyRun("static", {"layer": 1}), reference=full, batch_size=3, progress=False
    )
    merged, _ = load_model(str(setup_dir / "merged"))
    merged_static = dyvte.evaluate(
        merged, processor, recs, PolicyRun("static", {"layer": 1}), batch_size=3, progress=False
    )
    assert static.answers == merged_static.answers
    assert static.exit_layers == [1] * 6 and static.flops < 1.0


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "train" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _oracle_comparison(base_dir: Path, adapted_dir: Path, gold: list[str], tolerance: float) -> dict:
    """The summary ``compare_sweeps`` documents, computed here from each run's saved per-method answers.

    Accuracy of a result: the fraction of its answers equal to the normalized gold answer. Earliest K: the smallest K
    whose static-withdrawal accuracy is at least the base full accuracy minus ``tolerance`` (L when none is); with
    "every later K too", every K' >= K must reach it as well.
    """

    def load(run: Path, name: str) -> tuple[dyvte.EvalResult, float]:
        result = dyvte.EvalResult.load(run / f"{name}.json")
        accuracy = sum(a == normalize_answer(g) for a, g in zip(result.answers, gold, strict=True)) / len(gold)
        assert result.accuracy == pytest.approx(accuracy)  # the harness measured what the oracle recounts
        return result, accuracy

    base_full, base_accuracy = load(base_dir, "full")
    target = base_accuracy - tolerance
    summary: dict = {"target_accuracy": target, "base_full_accuracy": base_accuracy}
    for name, run in (("base", base_dir), ("adapted", adapted_dir)):
        sweep = [load(run, f"static_K={k}") for k in range(NUM_LAYERS + 1)]
        reach = [accuracy >= target for _, accuracy in sweep]
        earliest = reach.index(True) if any(reach) else NUM_LAYERS
        every = next((k for k in range(NUM_LAYERS + 1) if all(reach[k:])), NUM_LAYERS)
        summary[name] = {
            "earliest_K": earliest,
            "accuracy": sweep[earliest][1],
            "relative_flops": sweep[earliest][0].flops,
            "earliest_K_every_later_K_too": every,
        }
    adapted_full = dyvte.EvalResult.load(adapted_dir / "full.json")
    same = [a == b for a, b in zip(base_full.answers, adapted_full.answers, strict=True)]
    agreement = {"all": sum(same) / len(same)}
    for qtype in sorted(set(base_full.qtypes)):
        rows = [agree for agree, q in zip(same, base_full.qtypes, strict=True) if q == qtype]
        agreement[qtype] = sum(rows) / len(rows)
    summary["agreement_with_base_withdrawal_off"] = agreement
    return summary


def test_evaluate_script_on_the_adapter_dir_and_side_by_side_comparison(adapter_dir, setup_dir, capsys):
    evaluate_main = _load_script("evaluate").main
    common = {"split": "train", "batch_size": 6, "max_new_tokens": 2}
    # gold answers = the base model's own full answers: accuracy is then agreement with it, which withdrawal changes
    # K by K (the tiny models never produce the records' answers: every accuracy would be 0 and every K "earliest")
    first = evaluate_main(
        model=str(setup_dir / "model"),
        data=str(setup_dir / "records.jsonl"),
        methods=["full"],
        output_dir=str(setup_dir / "eval-gold"),
        **common,
    )[0]
    lines = [json.loads(line) for line in (setup_dir / "records.jsonl").read_text().splitlines()]
    gold = list(first.answers)
    (setup_dir / "records-gold.jsonl").write_text(
        "".join(json.dumps({**r, "answer": a}) + "\n" for r, a in zip(lines, gold, strict=True))
    )
    for model, out in ((setup_dir / "model", "eval-base"), (adapter_dir, "eval-lora")):
        evaluate_main(
            model=str(model),
            data=str(setup_dir / "records-gold.jsonl"),
            methods=["full", "static:all"],
            output_dir=str(setup_dir / out),
            **common,
        )
    base_dir, lora_dir = setup_dir / "eval-base", setup_dir / "eval-lora"
    capsys.readouterr()
    _load_script("adapt").compare(str(base_dir), str(lora_dir))
    printed = capsys.readouterr().out
    assert "| K | base accuracy | adapted accuracy |" in printed
    summary = json.loads((lora_dir / "comparison.json").read_text())
    expected = _oracle_comparison(base_dir, lora_dir, gold, 0.005)  # compare()'s default tolerance
    assert summary == _approx_nested(expected)
    for k in range(NUM_LAYERS + 1):  # the printed table: one row per K with both accuracies
        base_k = dyvte.EvalResult.load(base_dir / f"static_K={k}.json")
        lora_k = dyvte.EvalResult.load(lora_dir / f"static_K={k}.json")
        assert f"| {k} | {base_k.accuracy:.3f} | {lora_k.accuracy:.3f} | {base_k.flops:.3f} |" in printed
    earliest = set()
    for tolerance in (0.005, 0.6, 0.95):  # targets 0.995, 0.4, 0.05 of accuracy 1: different earliest K
        for adapted in (lora_dir, base_dir):  # the base run against itself: every answer agrees
            _, got = compare_sweeps(base_dir, adapted, tolerance)
            want = _oracle_comparison(base_dir, adapted, gold, tolerance)
            assert got == _approx_nested(want), (tolerance, adapted.name)
        assert want["adapted"] == want["base"] and set(want["agreement_with_base_withdrawal_off"].values()) == {1.0}
        earliest.add(want["base"]["earliest_K"])
    assert expected["base_full_accuracy"] == 1.0 and len(earliest) > 1  # the rule is exercised, not vacuous


def _approx_nested(expected: dict) -> dict:
    """``expected`` with every float wrapped in ``pytest.approx`` (nested dicts compare key by key)."""
    return {k: _approx_nested(v) if isinstance(v, dict) else pytest.approx(v) for k, v in expected.items()}


def test_an_adapter_for_another_base_is_one_clear_error(tmp_path):
    """An adapter of a 64-wide LLaVA loaded on the 128-wide demo: one error naming the adapter, its base and a module
    with both shapes, before peft's ``load_state_dict`` lists a ``size mismatch`` per tensor."""
    from dyvte.data.adapters import AdapterMismatchError, check_adapter
    from dyvte.demo import demo_checkpoint_dir
    from dyvte.train.lora import load_adapter

    tiny, _ = make_tiny("llava", num_layers=NUM_LAYERS)
    add_lora(tiny, rank=4, base_name="demo").save_pretrained(tmp_path / "adapter")  # records the demo as its base
    demo, _ = load_model("demo")
    with pytest.raises(AdapterMismatchError) as caught:
        load_model(str(tmp_path / "adapter"))
    message = str(caught.value)
    assert "size mismatch" not in message and message.count("\n") == 0
    assert f"LoRA adapter {tmp_path / 'adapter'} (trained on base_model_name_or_path='demo')" in message
    first = r"model\.language_model\.layers\.0\.mlp\.down_proj"
    assert re.search(rf": \d+ of its adapted factors do not fit, e.g. {first}: ", message)
    assert "the adapter's lora_A has shape (4, 128), this model's module maps 384 -> 128 features" in message  # FFN
    with pytest.raises(AdapterMismatchError, match="was trained on a base of another shape"):
        load_adapter(demo, tmp_path / "adapter")
    assert not any("lora_" in name for name, _ in demo.named_parameters())  # refused before peft touched the demo
    check_adapter(demo, demo_checkpoint_dir("demo-lora-vtw"))  # the committed adapter fits its base
    assert isinstance(load_adapter(load_model("demo")[0], demo_checkpoint_dir("demo-lora-vtw")), PeftModel)
    idefics, _ = make_tiny("idefics3", num_layers=2)  # its decoder is model.text_model
    with pytest.raises(AdapterMismatchError, match="adapts no module of this model"):
        check_adapter(idefics, tmp_path / "adapter")
