"""Trains the demo MLLM from scratch, the ordinary way (no withdrawal or pruning anywhere).

Six phases, each a Lightning ``fit`` on an endless, seeded stream of scenes drawn from the *train* handwriting pool:

1. ``VisionPretrainModule`` — the CLIP tower alone learns, for every patch of the layer the LLM reads (−2), which
   digit class its cell holds (or "empty") and which cell it lies in. Without this the LLM never learns to look.
2. ``AlignModule`` — LLaVA's stage 1 ("feature alignment"), here with a direct target: the projector learns to map
   each patch feature onto the word embedding of its cell's content ("0".."9", "none"); tower frozen.
3. ``DemoMLLMModule`` — the LLaVA model (tower frozen: training it on the questions washes the digit features out)
   learns to answer the questions plus the auxiliary "describe the grid" task (next-token loss on the answer only,
   averaged per sample so that long answers do not dominate).
4. The same, continued with a fresh learning-rate cycle and a mix weighted towards the question-conditioned types
   (exists, cell, rowsum).
5. "Matching": "is there a 7 ?" alone, over *sparse* scenes (at most 3 digits). On full scenes the decoder never
   learns to match a digit named in the question against the visual tokens (``exists`` stays at chance however long
   it trains); on sparse scenes a trained model does within about a thousand steps, and the skill carries over to full
   scenes. A curriculum, as ordinary as any: it changes which scenes are drawn, not the model or the loss.
6. "Consolidation": phase 4 again on a fresh stream of full scenes, which restores the other types (phase 5 alone
   forgets them) and spreads the matching skill to dense scenes.

``run_pretraining`` then saves model + processor to ``runs/pretrain-demo/mllm`` and the dataset to
``runs/pretrain-demo/data`` (ignored by git; pass ``output_dir`` / ``data_dir`` to regenerate the committed
``checkpoints/demo-mllm`` and ``checkpoints/demo-data``). ``train/pretrain_demo.py`` is its command-line launcher.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import TQDMProgressBar
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from dyvte.demo.data import (
    EMPTY,
    NONE_WORD,
    QTYPES,
    DatasetSizes,
    QuestionMix,
    SceneConfig,
    build_dataset,
    iter_records,
    render_scene,
)
from dyvte.demo.model import (
    IMAGE,
    DemoModelConfig,
    build_model,
    build_processor,
    format_prompts,
    generate_answers,
    load_demo_model,
    load_demo_processor,
    num_image_tokens,
    scene_pixel_values,
)
from dyvte.engine.compat import hidden_states_of, logits_of

logger = logging.getLogger(__name__)


@dataclass
class PhaseConfig:
    """Optimisation of one training phase.

    Attributes:
        steps: Optimizer steps.
        lr: Peak AdamW learning rate.
        warmup: Linear warm-up steps (then cosine decay to ``min_lr_ratio * lr``).
        weight_decay: AdamW weight decay.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        freeze_vision: Keep the CLIP tower fixed (phases 3-6: protects the digit features learned in phase 1).
        batch_size: Scenes per step (default: the recipe's ``batch_size``). Small batches learn faster per FLOP here.
        max_digits: Draw scenes with at most this many digits (default: the scene layout's ``max_digits``).
    """

    steps: int = 300
    lr: float = 2e-3
    warmup: int = 30
    weight_decay: float = 0.01
    min_lr_ratio: float = 0.05
    freeze_vision: bool = False
    batch_size: int | None = None
    max_digits: int | None = None


@dataclass
class TrainConfig:
    """The training recipe.

    Attributes:
        batch_size: Scenes per step.
        vision: Phase 1 (vision-tower pretraining on per-patch digit class and cell position).
        align: Phase 2 (projector onto the word embeddings of the cell contents).
        mllm: Phase 3 (the model on the questions + "describe").
        question_weights: Sampling weights of the phase-3 tasks; ``exists`` is the hardest and is oversampled.
        continuation: Phase 4, phase 3 continued with a fresh learning-rate cycle on a new stream of scenes.
        continuation_weights: Phase-4 (and phase-6) task weights, shifted towards the types still below target.
        matching: Phase 5, the curriculum step: questions drawn from ``matching_weights`` on sparse scenes
            (``matching.max_digits``).
        matching_weights: Phase-5 task weights (default: ``exists`` only).
        consolidation: Phase 6, phase 4 repeated on a fresh stream of full scenes.
        precision: Lightning precision. ``32-true``: bf16 autocast measured 6x slower than fp32 on this CPU with one
            thread (no native bf16 matmul); never fp16 on CPU.
        threads: ``torch.set_num_threads`` (leave the other cores to the rest of the machine).
        eval_samples: Validation records answered with ``generate`` at the end (logged per type).
        gradient_clip: Gradient-norm clipping of phases 3-6.
    """

    batch_size: int = 64
    vision: PhaseConfig = field(default_factory=lambda: PhaseConfig(steps=800, lr=2e-3, warmup=20))
    align: PhaseConfig = field(
        default_factory=lambda: PhaseConfig(steps=300, lr=2e-3, warmup=20, weight_decay=0.0, freeze_vision=True)
    )
    mllm: PhaseConfig = field(
        default_factory=lambda: PhaseConfig(steps=5000, lr=1e-3, warmup=100, freeze_vision=True, batch_size=16)
    )
    question_weights: dict[str, float] = field(
        default_factory=lambda: {"count": 1.0, "exists": 2.5, "cell": 1.5, "max": 1.0, "rowsum": 1.5, "describe": 1.5}
    )
    continuation: PhaseConfig = field(
        default_factory=lambda: PhaseConfig(steps=2400, lr=7e-4, warmup=50, freeze_vision=True, batch_size=16)
    )
    continuation_weights: dict[str, float] = field(
        default_factory=lambda: {"count": 0.3, "exists": 3.0, "cell": 3.0, "max": 0.7, "rowsum": 2.5, "describe": 1.5}
    )
    matching: PhaseConfig = field(
        default_factory=lambda: PhaseConfig(
            steps=1200, lr=1e-3, warmup=50, freeze_vision=True, batch_size=16, max_digits=3
        )
    )
    matching_weights: dict[str, float] = field(default_factory=lambda: {"exists": 1.0})
    consolidation: PhaseConfig = field(
        default_factory=lambda: PhaseConfig(steps=2400, lr=7e-4, warmup=50, freeze_vision=True, batch_size=16)
    )
    precision: str = "32-true"
    threads: int = 1
    eval_samples: int = 500
    gradient_clip: float = 1.0


# ------------------------------------------------------------------------------------------------------ data


class SceneBatches(IterableDataset):
    """Endless, seeded batches of training scenes, already tensorised (use with ``DataLoader(batch_size=None)``).

    Each batch holds ``pixel_values`` ``(B, 3, H, W)``, ``patch_digit`` / ``patch_cell`` ``(B, P)`` (phase 1) and
    right-padded ``input_ids`` / ``attention_mask`` / ``labels`` ``(B, T)`` (phase 2; ``labels`` is −100 except on
    the answer and ``</s>``). Right padding keeps the positions of the real tokens at 0.. as in left-padded generation.
    """

    def __init__(self, processor, scene: SceneConfig, batch_size: int, seed: int, weights: dict[str, float], stream=1):
        super().__init__()
        self.processor, self.scene, self.batch_size, self.seed = processor, scene, batch_size, seed
        self.mix, self.stream = QuestionMix(dict(weights)), stream
        self.patch_size = processor.patch_size
        self.image_text = IMAGE * num_image_tokens(processor)
        self._cache: dict[tuple[str, bool], list[int]] = {}

    def _patch_labels(self, grids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-patch cell index and digit class (10 = empty), row-major over the patch grid: ``(B, P)`` each."""
        per = self.scene.cell_px // self.patch_size
        rows = np.arange(self.scene.rows * per) // per
        cols = np.arange(self.scene.cols * per) // per
        cell = (rows[:, None] * self.scene.cols + cols[None, :]).reshape(-1)  # (P,)
        digit = grids[:, cell]  # (B, P)
        digit = np.where(digit == EMPTY, 10, digit)
        return torch.from_numpy(digit).long(), torch.from_numpy(np.broadcast_to(cell, digit.shape).copy()).long()

    def _ids(self, text: str, prompt: bool) -> list[int]:
        """Token ids of a question's expanded chat prompt or of an answer (memoised: the vocabulary is closed)."""
        key = (text, prompt)
        if key not in self._cache:
            if prompt:
                text = format_prompts(self.processor, [text])[0].replace(IMAGE, self.image_text)
            self._cache[key] = self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._cache[key]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        tok = self.processor.tokenizer
        records = iter_records("train", self.seed, self.scene, self.mix, stream=self.stream)
        while True:
            batch = [next(records) for _ in range(self.batch_size)]
            images = np.stack([render_scene(r["sources"], self.scene) for r in batch])  # (B, H, W)
            grids = np.asarray([r["grid"] for r in batch])  # (B, cells)
            prompt_ids = [self._ids(r["question"], prompt=True) for r in batch]
            answer_ids = [self._ids(r["answer"], prompt=False) for r in batch]
            seqs = [p + a + [tok.eos_token_id] for p, a in zip(prompt_ids, answer_ids, strict=True)]
            t = max(map(len, seqs))
            input_ids = torch.full((len(seqs), t), tok.pad_token_id, dtype=torch.long)
            labels = torch.full((len(seqs), t), -100, dtype=torch.long)
            mask = torch.zeros((len(seqs), t), dtype=torch.long)
            for i, (s, p) in enumerate(zip(seqs, prompt_ids, strict=True)):
                input_ids[i, : len(s)] = torch.tensor(s)
                labels[i, len(p) : len(s)] = torch.tensor(s[len(p) :])
                mask[i, : len(s)] = 1
            patch_digit, patch_cell = self._patch_labels(grids)
            yield {
                "pixel_values": scene_pixel_values(images),
                "patch_digit": patch_digit,
                "patch_cell": patch_cell,
                "input_ids": input_ids,
                "attention_mask": mask,
                "labels": labels,
            }


class SceneDataModule(L.LightningDataModule):
    """Serves :class:`SceneBatches` (in the main process: workers would take the cores the training needs)."""

    def __init__(
        self, processor, scene: SceneConfig, batch_size: int, seed: int, weights: dict[str, float], stream: int = 1
    ):
        super().__init__()
        self.stream = stream
        self.processor, self.scene, self.weights = processor, scene, weights
        self.batch_size, self.seed = batch_size, seed

    def train_dataloader(self) -> DataLoader:
        """The endless training stream."""
        ds = SceneBatches(self.processor, self.scene, self.batch_size, self.seed, self.weights, self.stream)
        return DataLoader(ds, batch_size=None, num_workers=0)


def phase_scene(scene: SceneConfig, phase: PhaseConfig) -> SceneConfig:
    """The scene layout a phase draws from: ``scene`` with the phase's ``max_digits`` cap, if it has one.

    Raises:
        ValueError: ``phase.max_digits`` below the layout's ``min_digits`` or above its number of cells.
    """
    if phase.max_digits is None:
        return scene
    if not scene.min_digits <= phase.max_digits <= scene.rows * scene.cols:
        raise ValueError(
            f"a phase's max_digits must lie in [{scene.min_digits}, {scene.rows * scene.cols}] "
            f"(the layout's min_digits .. number of cells), got {phase.max_digits}"
        )
    return replace(scene, max_digits=phase.max_digits)


# --------------------------------------------------------------------------------------------------- modules


def _warmup_cosine(optimizer: torch.optim.Optimizer, phase: PhaseConfig) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < phase.warmup:
            return (step + 1) / phase.warmup
        progress = min(1.0, (step - phase.warmup) / max(1, phase.steps - phase.warmup))
        return phase.min_lr_ratio + (1 - phase.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class VisionPretrainModule(L.LightningModule):
    """Phase 1: per-patch digit class (11-way) and cell position on the tower's layer-(−2) patch features."""

    def __init__(self, model, phase: PhaseConfig, n_cells: int):
        super().__init__()
        self.model, self.phase = model, phase
        d = model.config.vision_config.hidden_size
        self.digit_head = nn.Linear(d, 11)
        self.cell_head = nn.Linear(d, n_cells)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Cross-entropy of both heads on every patch."""
        tower = self.model.model.vision_tower
        layer = self.model.config.vision_feature_layer
        hidden = hidden_states_of(tower(batch["pixel_values"], output_hidden_states=True))[layer][:, 1:]  # (B, P, D)
        digit = self.digit_head(hidden)  # (B, P, 11)
        cell = self.cell_head(hidden)  # (B, P, cells)
        loss_digit = F.cross_entropy(digit.flatten(0, 1).float(), batch["patch_digit"].flatten())
        loss_cell = F.cross_entropy(cell.flatten(0, 1).float(), batch["patch_cell"].flatten())
        acc = (digit.argmax(-1) == batch["patch_digit"]).float().mean()
        self.log_dict({"digit_loss": loss_digit, "cell_loss": loss_cell, "digit_acc": acc}, prog_bar=True)
        return loss_digit + loss_cell

    def configure_optimizers(self):
        """AdamW over the tower and the two heads, warm-up + cosine."""
        params = list(self.model.model.vision_tower.parameters()) + list(self.digit_head.parameters())
        params += list(self.cell_head.parameters())
        opt = torch.optim.AdamW(params, lr=self.phase.lr, weight_decay=self.phase.weight_decay)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": _warmup_cosine(opt, self.phase), "interval": "step"}}


class AlignModule(L.LightningModule):
    """Phase 2: projector (and word embeddings) so that each patch lands on its cell's word ("0".."9", "none")."""

    def __init__(self, model, phase: PhaseConfig, word_ids: torch.Tensor):
        super().__init__()
        self.model, self.phase = model, phase
        self.register_buffer("word_ids", word_ids, persistent=False)  # (11,): digit class (10 = empty) -> token id
        self.model.model.vision_tower.requires_grad_(False)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Cross-entropy of (projected patch feature) x (word embeddings) against the cell's word."""
        layer = self.model.config.vision_feature_layer
        with torch.no_grad():
            tower = self.model.model.vision_tower(batch["pixel_values"], output_hidden_states=True)
        projected = self.model.model.multi_modal_projector(hidden_states_of(tower)[layer][:, 1:])  # (B, P, D)
        logits = projected @ self.model.get_input_embeddings().weight.T  # (B, P, V)
        target = self.word_ids[batch["patch_digit"]]  # (B, P)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())
        acc = (logits.argmax(-1) == target).float().mean()
        self.log_dict({"align_loss": loss, "align_acc": acc}, prog_bar=True)
        return loss

    def configure_optimizers(self):
        """AdamW over the projector and the word embeddings, warm-up + cosine."""
        params = list(self.model.model.multi_modal_projector.parameters())
        params += list(self.model.get_input_embeddings().parameters())
        opt = torch.optim.AdamW(params, lr=self.phase.lr, weight_decay=0.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": _warmup_cosine(opt, self.phase), "interval": "step"}}


class DemoMLLMModule(L.LightningModule):
    """Phases 3-6: the LLaVA model (tower frozen by ``freeze_vision``), next-token loss on the answer tokens, averaged
    per sample."""

    def __init__(self, model, phase: PhaseConfig):
        super().__init__()
        self.model, self.phase = model, phase
        self.model.model.vision_tower.requires_grad_(not phase.freeze_vision)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Per-sample mean answer loss, averaged over the batch."""
        out = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
        )
        logits = logits_of(out)[:, :-1].float()  # (B, T-1, V)
        target = batch["labels"][:, 1:]  # (B, T-1)
        tok_loss = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")  # (B, T-1)
        valid = (target != -100).float()
        loss = ((tok_loss * valid).sum(1) / valid.sum(1).clamp(min=1)).mean()
        acc = (((logits.argmax(-1) == target) | (target == -100)).all(1)).float().mean()
        self.log_dict({"loss": loss, "answer_acc": acc}, prog_bar=True)
        return loss

    def configure_optimizers(self):
        """AdamW (no decay on norms / biases), warm-up + cosine."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.phase.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=self.phase.lr, betas=(0.9, 0.98))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": _warmup_cosine(opt, self.phase), "interval": "step"}}


# ------------------------------------------------------------------------------------------------------- run


def _fit(
    module: L.LightningModule, data: SceneDataModule, phase: PhaseConfig, precision: str, clip: float | None = None
) -> float:
    trainer = L.Trainer(
        gradient_clip_val=clip,
        accelerator="cpu",
        devices=1,
        max_steps=phase.steps,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=25,
        num_sanity_val_steps=0,
        callbacks=[TQDMProgressBar(refresh_rate=25)],  # plain tqdm lines stay readable in a log file
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return time.perf_counter() - start


def evaluate_accuracy(model, processor, records, batch_size: int = 100, blank_images: bool = False) -> dict[str, float]:
    """Exact-match accuracy per question type and ``overall`` (greedy, left-padded batched ``generate``).

    Args:
        model: The MLLM.
        processor: Its processor.
        records: A ``datasets.Dataset`` with ``image``, ``question``, ``answer``, ``qtype``.
        batch_size: Generation batch size.
        blank_images: Answer with black images (text-only baseline).
    """
    correct: dict[str, list[bool]] = {}
    for i in range(0, len(records), batch_size):
        batch = records[i : i + batch_size]
        answers = generate_answers(model, processor, batch, blank_images=blank_images)
        for qtype, pred, ref in zip(batch["qtype"], answers, batch["answer"], strict=True):
            correct.setdefault(qtype, []).append(pred == ref)
    acc = {q: float(np.mean(correct[q])) for q in QTYPES if q in correct}
    acc["overall"] = float(np.mean([c for v in correct.values() for c in v]))
    return acc


def run_pretraining(
    train: TrainConfig,
    model: DemoModelConfig,
    scene: SceneConfig,
    sizes: DatasetSizes,
    seed: int = 0,
    output_dir: str | None = None,
    data_dir: str | None = None,
    init_from: str | None = None,
) -> dict[str, float]:
    """Builds the dataset and the model from scratch, trains the six phases and saves everything.

    Args:
        train: The training recipe.
        model: Model size.
        scene: Scene layout.
        sizes: Records per split of the stored dataset.
        seed: Seed of the dataset, the training stream and the initialisation.
        output_dir: Where model + processor go (default ``<repo>/runs/pretrain-demo/mllm``).
        data_dir: Where the dataset goes (default ``<repo>/runs/pretrain-demo/data``).
        init_from: Start from this saved model + processor instead of a random one (set a phase's ``steps`` to 0
            to skip it, e.g. to run only the continuation).

    Returns:
        Validation accuracy per question type and overall, plus the phase times in seconds.
    """
    model_cfg = model
    torch.set_num_threads(train.threads)
    L.seed_everything(seed, workers=True)
    runs = Path.cwd() / "runs" / "pretrain-demo"  # the launcher runs from the repository: runs/ is ignored by git
    out_dir = Path(output_dir) if output_dir else runs / "mllm"
    data_path = Path(data_dir) if data_dir else runs / "data"

    dataset = build_dataset(seed, sizes, scene)
    dataset.save_to_disk(str(data_path))
    logger.info("dataset saved to %s", data_path)

    if init_from:
        processor = load_demo_processor(init_from)
        mllm = load_demo_model(path=init_from).train()
    else:
        processor = build_processor(scene, model_cfg)
        mllm = build_model(processor, scene, model_cfg)
    logger.info("model: %.2f M parameters", sum(p.numel() for p in mllm.parameters()) / 1e6)

    times = {f"time_{name}_s": 0.0 for name in ("vision", "align", "mllm", "continuation", "matching", "consolidation")}

    def stream(phase: PhaseConfig, weights: dict[str, float], index: int) -> SceneDataModule:
        layout = phase_scene(scene, phase)
        return SceneDataModule(processor, layout, phase.batch_size or train.batch_size, seed, weights, stream=index)

    if train.vision.steps > 0:
        vision_pretrain = VisionPretrainModule(mllm, train.vision, scene.rows * scene.cols)
        data = stream(train.vision, train.question_weights, 1)
        times["time_vision_s"] = _fit(vision_pretrain, data, train.vision, train.precision)
        logger.info("phase 1 (vision tower) took %.0f s", times["time_vision_s"])
    if train.align.steps > 0:
        tok = processor.tokenizer
        words = torch.tensor(tok.convert_tokens_to_ids([str(d) for d in range(10)] + [NONE_WORD]))
        data = stream(train.align, train.question_weights, 3)
        times["time_align_s"] = _fit(AlignModule(mllm, train.align, words), data, train.align, train.precision)
        logger.info("phase 2 (alignment) took %.0f s", times["time_align_s"])
    question_phases = [  # (name, phase, task weights, stream index, description): phases 3-6, in order
        ("mllm", train.mllm, train.question_weights, 1, "phase 3 (questions)"),
        ("continuation", train.continuation, train.continuation_weights, 2, "phase 4 (continuation)"),
        ("matching", train.matching, train.matching_weights, 4, "phase 5 (matching on sparse scenes)"),
        ("consolidation", train.consolidation, train.continuation_weights, 5, "phase 6 (consolidation)"),
    ]
    for name, phase, weights, index, description in question_phases:
        if phase.steps > 0:
            module = DemoMLLMModule(mllm, phase)
            times[f"time_{name}_s"] = _fit(
                module, stream(phase, weights, index), phase, train.precision, train.gradient_clip
            )
            logger.info("%s took %.0f s", description, times[f"time_{name}_s"])

    mllm = mllm.float().eval()
    mllm.config.image_seq_length = num_image_tokens(processor)
    out_dir.mkdir(parents=True, exist_ok=True)
    mllm.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    logger.info("model and processor saved to %s", out_dir)

    n_eval = min(train.eval_samples, len(dataset["validation"]))
    acc = evaluate_accuracy(mllm, processor, dataset["validation"].select(range(n_eval)))
    logger.info("validation accuracy: %s", {k: round(v, 3) for k, v in acc.items()})
    return {**acc, **times}
