"""Tests of the embedded demo: the "digit scenes" builder, the processor / chat template, and the trained checkpoint."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import re

import numpy as np
import pytest
import torch
from PIL import Image

from dyvte.demo import (
    QTYPES,
    SceneConfig,
    build_dataset,
    build_processor,
    demo_checkpoint_dir,
    extract_answer,
    format_prompts,
    generate_answers,
    load_demo_dataset,
    load_demo_model,
    load_demo_processor,
    num_image_tokens,
    prepare_generation_inputs,
)
from dyvte.demo.data import DatasetSizes, build_records, load_digit_images, render_scene, split_digit_pools
from dyvte.demo.model import scene_pixel_values

from ..scripts import REPO_ROOT

SCENE = SceneConfig()
HAS_CHECKPOINT = (demo_checkpoint_dir() / "model.safetensors").is_file()
needs_checkpoint = pytest.mark.skipif(
    not HAS_CHECKPOINT, reason="checkpoints/demo-mllm missing: run `python train/pretrain_demo.py`"
)


@pytest.fixture(scope="module")
def small_dataset():
    return build_dataset(seed=3, sizes=DatasetSizes(train=120, validation=60, test=120))


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def _reference_answer(question: str, grid: list[int]) -> str:
    """An independent reading of the question text (not the builder's code) -> the answer from the grid."""
    cells = np.asarray(grid).reshape(SCENE.rows, SCENE.cols)
    digits = [g for g in grid if g >= 0]
    if question == "how many digits are there ?":
        return str(len(digits))
    if m := re.fullmatch(r"is there a (\d) \?", question):
        return "yes" if int(m[1]) in digits else "no"
    if m := re.fullmatch(r"what digit is in row (\d) column (\d) \?", question):
        v = cells[int(m[1]) - 1, int(m[2]) - 1]
        return "none" if v < 0 else str(v)
    if question == "what is the largest digit ?":
        return str(max(digits))
    if m := re.fullmatch(r"what is the sum of row (\d) \?", question):
        row = cells[int(m[1]) - 1]
        return str(int(row[row >= 0].sum()))
    raise AssertionError(f"unexpected question {question!r}")


# ------------------------------------------------------------------------------------------------ dataset


def test_handwriting_pools_are_disjoint_and_cover_all_digits():
    pools = split_digit_pools(0)
    _, targets = load_digit_images()
    sets = {k: set(v.tolist()) for k, v in pools.items()}
    assert not sets["train"] & sets["validation"]
    assert not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    assert set().union(*sets.values()) == set(range(1797))
    for pool in pools.values():
        assert set(targets[pool].tolist()) == set(range(10))


def test_splits_only_use_their_own_handwriting(small_dataset):
    pools = {k: set(v.tolist()) for k, v in split_digit_pools(3).items()}
    for split, ds in small_dataset.items():
        used = {s for rec in ds["sources"] for s in rec if s >= 0}
        assert used and used <= pools[split]


def test_same_seed_gives_identical_records(small_dataset):
    again = build_dataset(seed=3, sizes=DatasetSizes(train=120, validation=60, test=120))
    other = build_dataset(seed=4, sizes=DatasetSizes(train=120, validation=60, test=120))
    for split in small_dataset:
        a, b = small_dataset[split], again[split]
        for col in ("question", "answer", "qtype", "grid", "sources"):
            assert a[col] == b[col]
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a["image"], b["image"], strict=True))
    assert small_dataset["test"]["sources"] != other["test"]["sources"]


def test_answers_are_correct_by_construction(small_dataset):
    _, targets = load_digit_images()
    seen = set()
    for ds in small_dataset.values():
        for rec in ds:
            grid, sources = rec["grid"], rec["sources"]
            assert [targets[s] if s >= 0 else -1 for s in sources] == grid
            assert rec["answer"] == _reference_answer(rec["question"], grid)
            image = np.asarray(rec["image"])
            assert image.shape == SCENE.image_px and np.array_equal(image, render_scene(sources, SCENE))
            for cell, s in enumerate(sources):  # empty cells are black, filled ones are not
                r, c = divmod(cell, SCENE.cols)
                tile = image[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16]
                assert (tile.max() > 0) == (s >= 0)
            seen.add(rec["qtype"])
    assert seen == set(QTYPES)


def test_exists_questions_are_balanced():
    ds = build_dataset(seed=0, sizes=DatasetSizes(train=0, validation=0, test=600))["test"]
    answers = [a for a, q in zip(ds["answer"], ds["qtype"], strict=True) if q == "exists"]
    assert 0.35 < answers.count("yes") / len(answers) < 0.65


# ---------------------------------------------------------------------------------------------- processor


def test_chat_template_formats_as_documented(processor):
    assert format_prompts(processor, ["how many digits are there ?"]) == [
        "<s>USER: <image> how many digits are there ? ASSISTANT:"
    ]
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "is there a 7 ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
    ]
    assert (
        processor.apply_chat_template(conversation, tokenize=False)
        == "<s>USER: <image> is there a 7 ? ASSISTANT: yes</s> "
    )


def test_processor_expands_image_and_pads_left(processor, small_dataset):
    records = list(small_dataset["test"].select(range(8)))
    inputs = prepare_generation_inputs(processor, records)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    n_image = (inputs["input_ids"] == image_id).sum(1)  # (B,)
    assert num_image_tokens(processor) == 36 and (n_image == 36).all()  # 6 x 6 patches, [CLS] dropped
    assert inputs["pixel_values"].shape == (8, 3, 48, 48)
    assert (inputs["attention_mask"][:, -1] == 1).all()  # left padding: every row ends with its last token
    assert processor.tokenizer.unk_token_id not in inputs["input_ids"]
    fast = scene_pixel_values(np.stack([np.asarray(r["image"]) for r in records]))
    torch.testing.assert_close(fast, inputs["pixel_values"])


def test_visual_tokens_dominate_every_prompt(processor):
    ds = build_dataset(seed=0, sizes=DatasetSizes(train=0, validation=0, test=200))["test"]
    longest = {}
    for rec in ds:
        longest[rec["qtype"]] = max(longest.get(rec["qtype"], ""), rec["question"], key=len)
    image = Image.new("L", SCENE.image_px)
    for question in longest.values():
        ids = prepare_generation_inputs(processor, [{"image": image, "question": question}])["input_ids"][0]
        assert num_image_tokens(processor) / len(ids) >= 0.6, question


def test_extract_answer():
    assert extract_answer("<s>USER: <image> is there a 7 ? ASSISTANT: yes</s>") == "yes"
    assert extract_answer(" 12 ") == "12"
    assert extract_answer("none</s> 3") == "none"


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/pretrain_demo.py"):
        load_demo_processor(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------- trained checkpoint


@needs_checkpoint
def test_saved_model_loads_offline_and_answers_test_questions():
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    torch.set_num_threads(1)
    model, processor = load_demo_model(), load_demo_processor()
    assert isinstance(model, LlavaForConditionalGeneration) and isinstance(processor, LlavaProcessor)
    assert processor.tokenizer.padding_side == "left"
    assert model.config.vision_feature_select_strategy == "default" and model.config.vision_feature_layer == -2
    assert model.config.text_config.num_hidden_layers >= 8
    test = load_demo_dataset("test")
    records = test.select(range(100))  # every question type
    answers = generate_answers(model, processor, records[:])
    blank = generate_answers(model, processor, records[:], blank_images=True)
    right = np.asarray([a == r for a, r in zip(answers, records["answer"], strict=True)])
    blank_right = np.asarray([a == r for a, r in zip(blank, records["answer"], strict=True)])
    assert right.mean() >= 0.85, list(zip(answers, records["answer"], strict=True))
    assert right.mean() >= blank_right.mean() + 0.5  # the image matters
    qtypes = np.asarray(records["qtype"])
    for qtype in QTYPES:  # every type is read from the image (checkpoints/README.md: 0.83-0.98 on the test split)
        assert right[qtypes == qtype].mean() >= 0.7, qtype
        assert right[qtypes == qtype].mean() > blank_right[qtypes == qtype].mean(), qtype
    single = generate_answers(model, processor, [records[0]])  # a batch of one agrees with the padded batch
    assert single == answers[:1]


@needs_checkpoint
def test_stored_dataset_matches_the_builder():
    stored = load_demo_dataset()
    assert set(stored) == {"train", "validation", "test"}
    rebuilt = build_dataset(seed=0, sizes=DatasetSizes(train=5, validation=5, test=5))
    for split in stored:
        head = stored[split].select(range(5))
        assert head["question"] == rebuilt[split]["question"] and head["sources"] == rebuilt[split]["sources"]


def test_records_past_the_stored_split_continue_its_stream():
    """build_records(split, a, b) is records a..b-1 of the split as build_dataset stores it, images included."""
    whole = build_dataset(seed=3, sizes=DatasetSizes(train=40, validation=0, test=0))["train"]
    tail = build_records("train", 25, 40, seed=3)
    assert len(tail) == 15
    assert tail["question"] == whole["question"][25:] and tail["sources"] == whole["sources"][25:]
    assert [np.asarray(i).tolist() for i in tail["image"][:3]] == [
        np.asarray(i).tolist() for i in whole["image"][25:28]
    ]
    with pytest.raises(ValueError, match="start <= stop"):
        build_records("train", 5, 2)


def test_exported_records_are_read_by_fit_as_the_stream_gives_them(tmp_path):
    """export_records (train/demo_records.py) writes a stream range that load_records (fit's reader) reads back as
    build_records gives it; an existing folder is refused unless overwritten, and the old one is kept."""
    from dyvte.data.sources import load_records
    from dyvte.demo.data import export_records

    out = export_records("validation", 1003, 1010, tmp_path / "records")
    read = load_records(str(out), "train")
    built = build_records("validation", 1003, 1010)
    assert len(read) == 7 and read["question"] == built["question"] and read["answer"] == built["answer"]
    assert [np.asarray(i).tolist() for i in read["image"]] == [np.asarray(i).tolist() for i in built["image"]]
    stored = load_demo_dataset("validation").select(range(1003, 1010))  # inside the stored split: the same records
    assert read["question"] == stored["question"] and read["sources"] == stored["sources"]
    with pytest.raises(ValueError, match="exists"):
        export_records("validation", 0, 2, out)
    assert len(load_records(str(out), "train")) == 7
    assert len(load_records(str(export_records("validation", 0, 2, out, overwrite=True)), "train")) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["records"]  # no temporary folder left
    with pytest.raises(ValueError, match="split must be one of"):
        export_records("valid", 0, 2, tmp_path / "x")


# ------------------------------------------------------------------------------------------------ recipe


def test_recipe_yaml_equals_the_code_defaults():
    """`python train/pretrain_demo.py --config configs/pretrain_demo.yaml` and `run_pretraining()` train the same."""
    from dataclasses import asdict

    import yaml

    from dyvte.demo.model import DemoModelConfig
    from dyvte.demo.pretrain import PhaseConfig, TrainConfig

    cfg = yaml.safe_load((REPO_ROOT / "configs" / "pretrain_demo.yaml").read_text())
    phases = {k: PhaseConfig(**v) for k, v in cfg["train"].items() if isinstance(v, dict) and "steps" in v}
    assert TrainConfig(**{**cfg["train"], **phases}) == TrainConfig()
    assert cfg["model"] == asdict(DemoModelConfig())
    scene = asdict(SceneConfig())
    scene["pool_fractions"] = list(scene["pool_fractions"])
    assert cfg["scene"] == scene


def test_matching_phase_draws_sparse_scenes_and_rejects_impossible_caps(processor):
    from dyvte.demo.pretrain import PhaseConfig, SceneBatches, TrainConfig, phase_scene

    phase = TrainConfig().matching
    layout = phase_scene(SCENE, phase)
    assert layout.max_digits == phase.max_digits == 3 and layout.rows == SCENE.rows
    assert phase_scene(SCENE, PhaseConfig()) is SCENE
    batch = next(iter(SceneBatches(processor, layout, 32, seed=0, weights=TrainConfig().matching_weights)))
    filled = (batch["patch_digit"] != 10).view(32, -1).sum(1) // 4  # 2 x 2 patches per cell
    assert int(filled.max()) <= 3 and int(filled.min()) >= 1
    for bad in (0, SCENE.rows * SCENE.cols + 1):
        with pytest.raises(ValueError, match="max_digits"):
            phase_scene(SCENE, PhaseConfig(max_digits=bad))


def test_committed_demo_heads_load_onto_the_demo_model():
    """The demo's committed exit heads fit the demo model, cost < 1% of a prefill, and rows no head fires for are the
    full model (needs the demo data, hence here and not with the inference-only policy tests)."""
    import dyvte
    from dyvte.data.records import build_inputs as inputs_of
    from dyvte.demo import load_demo_dataset, load_demo_model, load_demo_processor
    from dyvte.engine.registry import resolve
    from dyvte.eval.flops import prefill_flops
    from dyvte.policies.exit_heads import ExitHeads
    from tests.scripts import REPO_ROOT

    model, processor = load_demo_model(), load_demo_processor()
    heads = ExitHeads.from_pretrained(REPO_ROOT / "checkpoints" / "demo-exit-heads")
    heads.check_model(model)
    batch = inputs_of(processor, list(load_demo_dataset("test").select(range(8))))
    tokens = batch["attention_mask"].sum(1)
    visual = torch.isin(batch["input_ids"], resolve(model).visual_ids).sum(1)
    prefill = prefill_flops(model.config, tokens, visual).full  # (B,) the full model's prefill FLOPs per row
    assert heads.num_heads * heads.flops_per_row() <= 0.01 * prefill.min()  # every head costs < 1% of a prefill
    with torch.no_grad():
        base = model(**batch).logits[:, -1]
    with dyvte.withdraw(model, heads=heads, threshold=0.5) as handle, torch.no_grad():
        last = model(**batch).logits[:, -1]
        exits = handle.exit_layers
    assert ((exits >= 1) & (exits <= 8)).all()
    never = exits == 8  # rows whose heads never fired are the full model
    torch.testing.assert_close(last[never], base[never], atol=1e-5, rtol=1e-5)
