"""The "digit scenes" VQA dataset: grids of real handwritten digits with short-answer questions.

Every image is a ``rows x cols`` grid of cells; a cell is either empty (black) or holds one of scikit-learn's 1797 real
handwritten 8x8 digits, upscaled to ``cell_px`` pixels. The 1797 digits are split into disjoint handwriting pools
(train / validation / test) *before* any scene is composed, so the test split only shows handwriting that training
never saw. Everything is a pure function of a seed: the same seed gives byte-identical records.

Question types (graded difficulty, answers are single words):

- ``count``   "how many digits are there ?"        -> "0" .. "9"
- ``exists``  "is there a 7 ?"                     -> "yes" / "no"
- ``cell``    "what digit is in row 2 column 3 ?"  -> "0" .. "9" / "none"
- ``max``     "what is the largest digit ?"        -> "0" .. "9"
- ``rowsum``  "what is the sum of row 2 ?"         -> "0" .. "27" (empty cells count 0)

``describe`` ("describe the grid ." -> one word per cell, row-major, e.g. "3 none 5 ...") is an auxiliary training
task; it is not part of the evaluation splits.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

QTYPES: tuple[str, ...] = ("count", "exists", "cell", "max", "rowsum")
"""The evaluated question types, in order of the reports."""

SPLITS: tuple[str, ...] = ("train", "validation", "test")
EMPTY = -1
"""Grid value of an empty cell."""
NONE_WORD = "none"


@dataclass
class SceneConfig:
    """How scenes are composed.

    Attributes:
        rows: Grid rows.
        cols: Grid columns.
        cell_px: Side of a cell in pixels (the 8 px digits are upscaled to it).
        min_digits: Fewest filled cells in a scene.
        max_digits: Most filled cells in a scene (at most ``rows * cols``).
        pool_fractions: Fractions of the 1797 digits given to the train / validation / test handwriting pools
            (stratified per digit class).
    """

    rows: int = 3
    cols: int = 3
    cell_px: int = 16
    min_digits: int = 1
    max_digits: int = 9
    pool_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)

    @property
    def image_px(self) -> tuple[int, int]:
        """(height, width) of a scene image in pixels."""
        return self.rows * self.cell_px, self.cols * self.cell_px


@dataclass
class DatasetSizes:
    """Number of records per split of the stored dataset."""

    train: int = 20000
    validation: int = 1000
    test: int = 2000

    def as_dict(self) -> dict[str, int]:
        """The sizes keyed by split name."""
        return {"train": self.train, "validation": self.validation, "test": self.test}


@dataclass
class QuestionMix:
    """Relative sampling weights of the question types (evaluation splits use the uniform mix)."""

    weights: dict[str, float] = field(default_factory=lambda: {q: 1.0 for q in QTYPES})

    def normalized(self) -> tuple[list[str], np.ndarray]:
        """Question types and their probabilities."""
        names = list(self.weights)
        p = np.asarray([self.weights[n] for n in names], dtype=np.float64)
        return names, p / p.sum()


@lru_cache(maxsize=1)
def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits.

    Returns:
        ``(images, targets)``: images ``(1797, 8, 8)`` uint8 in 0..255, targets ``(1797,)`` int64 in 0..9.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # values 0..16 -> 0..255
    return images, digits.target.astype(np.int64)


def split_digit_pools(seed: int, fractions: Sequence[float] = (0.7, 0.1, 0.2)) -> dict[str, np.ndarray]:
    """Splits the 1797 digit indices into disjoint handwriting pools, stratified per class.

    Args:
        seed: Seed of the split.
        fractions: Train / validation / test fractions (normalized to sum 1).

    Returns:
        Split name -> sorted int64 array of indices into :func:`load_digit_images`.
    """
    _, targets = load_digit_images()
    rng = np.random.default_rng([seed, 1797])
    frac = np.asarray(fractions, dtype=np.float64)
    frac = frac / frac.sum()
    pools: dict[str, list[int]] = {s: [] for s in SPLITS}
    for cls in range(10):
        idx = rng.permutation(np.flatnonzero(targets == cls))
        cuts = np.rint(np.cumsum(frac)[:-1] * len(idx)).astype(int)
        for name, part in zip(SPLITS, np.split(idx, cuts), strict=True):
            pools[name].extend(part.tolist())
    return {s: np.asarray(sorted(v), dtype=np.int64) for s, v in pools.items()}


@lru_cache(maxsize=4)
def _upscaled_digits(cell_px: int) -> np.ndarray:
    """All digits upscaled (bilinear) to ``(1797, cell_px, cell_px)`` uint8."""
    images, _ = load_digit_images()
    return np.stack([np.asarray(Image.fromarray(im).resize((cell_px, cell_px), Image.BILINEAR)) for im in images])


def render_scene(sources: Sequence[int], cfg: SceneConfig) -> np.ndarray:
    """Draws a scene.

    Args:
        sources: Row-major digit index per cell (into :func:`load_digit_images`), ``-1`` for an empty cell.
        cfg: Scene layout.

    Returns:
        ``(H, W)`` uint8 grayscale image, black background.
    """
    tiles = _upscaled_digits(cfg.cell_px)
    h, w = cfg.image_px
    out = np.zeros((h, w), dtype=np.uint8)
    c = cfg.cell_px
    for cell, src in enumerate(sources):
        if src >= 0:
            r, k = divmod(cell, cfg.cols)
            out[r * c : (r + 1) * c, k * c : (k + 1) * c] = tiles[src]
    return out


def sample_grid(rng: np.random.Generator, pool: np.ndarray, cfg: SceneConfig) -> tuple[list[int], list[int]]:
    """Draws which cells are filled and with which handwritten digit.

    Returns:
        ``(grid, sources)``: row-major digit class per cell (``-1`` empty) and digit index per cell (``-1`` empty).
    """
    _, targets = load_digit_images()
    n_cells = cfg.rows * cfg.cols
    n = int(rng.integers(cfg.min_digits, min(cfg.max_digits, n_cells) + 1))
    filled = rng.choice(n_cells, size=n, replace=False)
    sources = [EMPTY] * n_cells
    for cell in filled.tolist():
        sources[cell] = int(pool[rng.integers(len(pool))])
    grid = [int(targets[s]) if s >= 0 else EMPTY for s in sources]
    return grid, sources


def answer_question(grid: Sequence[int], qtype: str, arg: int | None, cfg: SceneConfig) -> str:
    """The correct answer to a question about ``grid`` (the reference the tests and evaluation check against).

    Args:
        grid: Row-major digit class per cell, ``-1`` empty.
        qtype: Question type.
        arg: The digit (``exists``), the 0-based cell (``cell``) or the 0-based row (``rowsum``); else ``None``.
        cfg: Scene layout.

    Returns:
        The answer word(s).
    """
    digits = [g for g in grid if g >= 0]
    if qtype == "count":
        return str(len(digits))
    if qtype == "exists":
        return "yes" if arg in digits else "no"
    if qtype == "cell":
        return str(grid[arg]) if grid[arg] >= 0 else NONE_WORD
    if qtype == "max":
        return str(max(digits))
    if qtype == "rowsum":
        row = grid[arg * cfg.cols : (arg + 1) * cfg.cols]
        return str(sum(g for g in row if g >= 0))
    if qtype == "describe":
        return " ".join(str(g) if g >= 0 else NONE_WORD for g in grid)
    raise ValueError(f"unknown question type {qtype!r}")


def question_text(qtype: str, arg: int | None, cfg: SceneConfig) -> str:
    """The question's wording (words separated by single spaces; rows / columns are 1-based)."""
    if qtype == "count":
        return "how many digits are there ?"
    if qtype == "exists":
        return f"is there a {arg} ?"
    if qtype == "cell":
        r, c = divmod(arg, cfg.cols)
        return f"what digit is in row {r + 1} column {c + 1} ?"
    if qtype == "max":
        return "what is the largest digit ?"
    if qtype == "rowsum":
        return f"what is the sum of row {arg + 1} ?"
    if qtype == "describe":
        return "describe the grid ."
    raise ValueError(f"unknown question type {qtype!r}")


def sample_question(rng: np.random.Generator, grid: Sequence[int], qtype: str, cfg: SceneConfig) -> int | None:
    """Draws the question's argument; ``exists`` is balanced between present and absent digits."""
    if qtype == "exists":
        present = sorted({g for g in grid if g >= 0})
        absent = [d for d in range(10) if d not in present]
        choices = present if (rng.random() < 0.5 and present) or not absent else absent
        return int(choices[rng.integers(len(choices))])
    if qtype == "cell":
        return int(rng.integers(cfg.rows * cfg.cols))
    if qtype == "rowsum":
        return int(rng.integers(cfg.rows))
    return None


def sample_record(rng: np.random.Generator, pool: np.ndarray, cfg: SceneConfig, qtype: str) -> dict:
    """One record without its rendered image.

    Returns:
        Dict with ``question``, ``answer``, ``qtype``, ``grid`` and ``sources``.
    """
    grid, sources = sample_grid(rng, pool, cfg)
    arg = sample_question(rng, grid, qtype, cfg)
    return {
        "question": question_text(qtype, arg, cfg),
        "answer": answer_question(grid, qtype, arg, cfg),
        "qtype": qtype,
        "grid": grid,
        "sources": sources,
    }


def iter_records(
    split: str, seed: int, cfg: SceneConfig, mix: QuestionMix | None = None, stream: int = 0
) -> Iterator[dict]:
    """An endless deterministic stream of records drawn from one split's handwriting pool.

    Args:
        split: ``train``, ``validation`` or ``test`` (picks the handwriting pool).
        seed: Dataset seed (the pools depend on it too).
        cfg: Scene layout.
        mix: Question-type weights (default uniform over :data:`QTYPES`).
        stream: Distinguishes independent streams of the same split (e.g. the training stream from the stored train
            records).

    Yields:
        Records as in :func:`sample_record`.
    """
    pool = split_digit_pools(seed, cfg.pool_fractions)[split]
    names, p = (mix or QuestionMix()).normalized()
    rng = np.random.default_rng([seed, SPLITS.index(split), stream])
    while True:
        qtype = names[int(rng.choice(len(names), p=p))]
        yield sample_record(rng, pool, cfg, qtype)


def vocabulary_words(cfg: SceneConfig) -> list[str]:
    """Every word a question or answer of this layout can contain, in a fixed order."""
    words: list[str] = []
    args: dict[str, list[int | None]] = {
        "count": [None],
        "exists": list(range(10)),
        "cell": list(range(cfg.rows * cfg.cols)),
        "max": [None],
        "rowsum": list(range(cfg.rows)),
        "describe": [None],
    }
    for qtype, qargs in args.items():
        for arg in qargs:
            words.extend(question_text(qtype, arg, cfg).split())
    words += [str(i) for i in range(9 * cfg.cols + 1)] + ["yes", "no", NONE_WORD]
    return list(dict.fromkeys(words))


def build_dataset(seed: int = 0, sizes: DatasetSizes | None = None, cfg: SceneConfig | None = None):
    """Builds the stored "digit scenes" dataset.

    Args:
        seed: Dataset seed.
        sizes: Records per split.
        cfg: Scene layout.

    Returns:
        ``datasets.DatasetDict`` with ``train`` / ``validation`` / ``test``; columns ``image`` (PIL, grayscale),
        ``question``, ``answer``, ``qtype``, ``grid`` (row-major ints, -1 empty) and ``sources`` (indices into
        ``sklearn.datasets.load_digits()``, -1 empty).
    """
    import datasets

    sizes = sizes or DatasetSizes()
    cfg = cfg or SceneConfig()
    out = {split: build_records(split, 0, n, seed, cfg) for split, n in sizes.as_dict().items()}
    return datasets.DatasetDict(out)


def dataset_features():
    """The stored dataset's ``datasets.Features``."""
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "qtype": datasets.Value("string"),
            "grid": datasets.Sequence(datasets.Value("int8")),
            "sources": datasets.Sequence(datasets.Value("int16")),
        }
    )


def build_records(
    split: str, start: int, stop: int, seed: int = 0, cfg: SceneConfig | None = None, progress: bool = False
):
    """Records ``start..stop-1`` of one split's deterministic stream, as :func:`build_dataset` stores them
    (``progress``: a bar with an ETA over the records rendered).

    Prefix-stable: ``build_records(split, a, b)`` equals records ``a..b-1`` of ``build_dataset(...)[split]`` for any
    stored size ``>= b``, images included, so a run may take more training records than ``checkpoints/demo-data``
    holds (only records ``start..`` are rendered).

    Returns:
        ``datasets.Dataset`` with the stored dataset's columns.
    """
    import datasets

    if not 0 <= start <= stop:
        raise ValueError(f"build_records: 0 <= start <= stop expected, got {start}, {stop}")
    cfg = cfg or SceneConfig()
    features = dataset_features()
    from tqdm.auto import tqdm

    records = []
    with tqdm(total=stop - start, desc=f"rendering {split} records", unit="record", disable=not progress) as bar:
        for index, rec in zip(range(stop), iter_records(split, seed, cfg), strict=False):
            if index >= start:
                rec["image"] = Image.fromarray(render_scene(rec["sources"], cfg))
                records.append(rec)
                bar.update()
    logger.info("built %s records %d..%d", split, start, stop - 1)
    if records:
        return datasets.Dataset.from_list(records, features=features)
    return datasets.Dataset.from_dict({k: [] for k in features}, features=features)


def export_records(
    split: str, start: int, stop: int, output: str | Path, overwrite: bool = False, progress: bool = False
) -> Path:
    """Write records ``start..stop-1`` of the demo split's stream (:func:`build_records`) as a ``save_to_disk``
    folder that ``train/fit.py --data.source.data`` reads, e.g. validation records 15000.. for heads that learn from
    handwriting the model never trained on (docs/guide.md, "Toward 75%").

    The folder is written beside ``output`` and renamed into place once complete, so an interrupted export leaves
    nothing half-written. ``progress``: a bar with an ETA while the records render, and one while they are saved.

    Raises:
        ValueError: an unknown split, a bad range, or ``output`` exists without ``overwrite``.
    """
    import shutil
    import tempfile

    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    output = Path(output)
    if output.exists() and not overwrite:
        raise ValueError(f"{output} exists; pass overwrite=True (--overwrite) to replace it")
    records = build_records(split, start, stop, progress=progress)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        records.save_to_disk(str(tmp))
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote %d %s records (%d..%d) to %s", len(records), split, start, stop - 1, output)
    return output
