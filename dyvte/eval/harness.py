"""The evaluation harness: a dataset of (image, question, answer) through ``generate`` under a method.

Per question type and overall: exact-match accuracy, agreement with a reference (normally the full model's answers),
exit-layer mean and percentiles, mean prefill FLOPs relative to the full model (``dyvte.prefill_flops``, detailed
convention, text decoder + LM head on one position), mean KV-cache bytes per sample after the prefill
(``dyvte.prefill_kv_bytes``, padding excluded), and wall-clock prefill and total generation time per sample
(overall only: batches mix question types). Metrics are accumulated with ``torchmetrics``.

``torchmetrics`` (slow to import), ``matplotlib`` and the benchmark helpers (which pull transformers' LLaVA model
code) are imported inside the functions that use them, so that ``import dyvte`` stays cheap.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dyvte.data.answers import gold_text, normalize_answer
from dyvte.data.records import build_inputs, iter_batches
from dyvte.engine.registry import resolve, unwrap
from dyvte.eval.flops import prefill_flops, prefill_kv_bytes
from dyvte.eval.methods import Full, Method
from dyvte.policies.shift import ScoreMonitor
from dyvte.utils.checks import check_positive_int
from dyvte.utils.devices import model_device, to_device
from dyvte.utils.io import atomic_path, write_text_atomic
from dyvte.utils.modes import eval_mode

__all__ = [
    "EvalResult",
    "evaluate",
    "format_histogram",
    "format_per_type",
    "format_table",
    "oracle_exit",
    "plot_sweep",
]

logger = logging.getLogger(__name__)
OVERALL = "all"


@dataclass
class EvalResult:
    """What :func:`evaluate` measured for one method.

    Attributes:
        method: the method's name.
        metrics: per question type (and ``"all"``): accuracy, agreement, exit-layer mean / p10 / p50 / p90,
            relative prefill FLOPs, mean KV-cache bytes per sample after the prefill, sample count; ``"all"``
            also has prefill_ms and total_ms per sample, and prefill_ms_p10 / prefill_ms_p90: the spread of the
            per-batch prefill time per sample over the batches.
        answers: normalized predicted answers, in dataset order.
        exit_layers: per-sample exit layers, in dataset order.
        relative_flops: per-sample prefill FLOPs relative to the full model, in dataset order.
        qtypes: per-sample question types, in dataset order.
        shift: for learned exits whose heads carry a ``score_reference``: the shift check over every evaluated
            row (:class:`dyvte.policies.shift.ShiftReport` as a dict: per head n, KS statistic, p-value; ``alpha``,
            ``shifted``, ``meaning``); ``None`` otherwise.
    """

    method: str
    metrics: dict[str, dict[str, float]]
    answers: list[str] = field(repr=False)
    exit_layers: list[int] = field(repr=False)
    relative_flops: list[float] = field(repr=False)
    qtypes: list[str] = field(default_factory=list, repr=False)
    shift: dict | None = field(default=None, repr=False)

    @property
    def accuracy(self) -> float:
        """Overall exact-match accuracy."""
        return self.metrics[OVERALL]["accuracy"]

    @property
    def flops(self) -> float:
        """Overall mean relative prefill FLOPs."""
        return self.metrics[OVERALL]["relative_flops"]

    def save(self, path: str | Path) -> None:
        """Write the result as JSON (atomically: a failed save leaves the file that stood there)."""
        write_text_atomic(path, json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        """Read a result written by :meth:`save`."""
        return cls(**json.loads(Path(path).read_text()))


class _Meters:
    """torchmetrics accumulators for one group of samples."""

    def __init__(self) -> None:
        from torchmetrics.aggregation import CatMetric, MeanMetric  # lazy: torchmetrics takes seconds to import

        self.accuracy, self.agreement, self.flops = MeanMetric(), MeanMetric(), MeanMetric()
        self.kv_bytes = MeanMetric()
        self.exits = CatMetric()

    def update(
        self, correct: torch.Tensor, agree: torch.Tensor, flops: torch.Tensor, exits: torch.Tensor, kv: torch.Tensor
    ) -> None:
        self.kv_bytes.update(kv.float())
        self.accuracy.update(correct.float())
        self.agreement.update(agree.float())
        self.flops.update(flops.float())
        self.exits.update(exits.float())

    def compute(self) -> dict[str, float]:
        exits = self.exits.compute().flatten()
        q = torch.quantile(exits, torch.tensor([0.1, 0.5, 0.9]))
        return {
            "accuracy": float(self.accuracy.compute()),
            "agreement": float(self.agreement.compute()),
            "relative_flops": float(self.flops.compute()),
            "kv_bytes": float(self.kv_bytes.compute()),
            "exit_mean": float(exits.mean()),
            "exit_p10": float(q[0]),
            "exit_p50": float(q[1]),
            "exit_p90": float(q[2]),
            "samples": int(exits.numel()),
        }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    processor,
    dataset,
    method: Method | None = None,
    *,
    reference: EvalResult | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 8,
    progress: bool = True,
    warmup: bool = True,
) -> EvalResult:
    """Run ``dataset`` through greedy ``generate`` under ``method`` and measure it.

    Args:
        model: a supported model (run in eval mode, see below).
        processor: its processor (chat template, left padding).
        dataset: a ``datasets.Dataset`` (or list) of records with ``image``, ``question``, ``answer`` and
            optionally ``qtype``.
        method: what to run (default: the full model).
        reference: a result whose answers define "agreement" (default: the method's own answers when it is the
            full model; otherwise the full model is run first).
        batch_size: rows per ``generate`` call.
        max_new_tokens: generation length (answers are short).
        progress: show a progress bar over batches.
        warmup: run the first batch once, untimed, before measuring.

    Returns:
        The :class:`EvalResult`.

    The model runs in eval mode (a model in training mode is switched, with a warning, and restored afterwards):
    dropout would change the answers and every metric.
    """
    check_positive_int("evaluate: batch_size", batch_size)
    check_positive_int("evaluate: max_new_tokens", max_new_tokens)
    with eval_mode(model, "evaluate"):
        return _evaluate(
            model, processor, dataset, method or Full(), reference, batch_size, max_new_tokens, progress, warmup
        )


def _evaluate(
    model: nn.Module,
    processor,
    dataset,
    method: Method,
    reference: EvalResult | None,
    batch_size: int,
    max_new_tokens: int,
    progress: bool,
    warmup: bool,
) -> EvalResult:
    from dyvte.eval.benchmark import StepClock  # lazy: the benchmark module imports transformers' LLaVA model code

    model = unwrap(model)
    spec = resolve(model)
    if reference is None and not isinstance(method, Full):
        logger.info("no reference given: running the full model first for agreement")
        reference = evaluate(
            model, processor, dataset, Full(), batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress
        )
    if reference is not None and len(reference.answers) != len(dataset):
        raise ValueError(f"reference has {len(reference.answers)} answers for {len(dataset)} samples")
    meters: dict[str, _Meters] = defaultdict(_Meters)
    answers: list[str] = []
    exits_all: list[int] = []
    flops_all: list[float] = []
    qtypes: list[str] = []
    prefill_s = total_s = 0.0
    batch_ms: list[float] = []  # prefill ms per sample of each batch (the spread)
    pooled: ScoreMonitor | None = None  # learned exits: every batch's head scores, for the shift check
    num_batches = (len(dataset) + batch_size - 1) // batch_size
    item_bytes = torch.finfo(model.dtype).bits // 8
    device = model_device(model)  # inputs go there; what the metrics read comes back to the host
    if warmup:  # one untimed batch, so the first method measured does not pay for allocator / kernel warm-up
        records = next(iter_batches(dataset, batch_size, answers=True, processor=processor))
        inputs = to_device(build_inputs(processor, records, dtype=model.dtype), device)
        with method.apply(model):
            model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    batches = iter_batches(dataset, batch_size, answers=True, processor=processor)
    for index, records in enumerate(tqdm(batches, total=num_batches, desc=method.name, disable=not progress)):
        host = build_inputs(processor, records, offset=index * batch_size, dtype=model.dtype)
        inputs = to_device(host, device)
        clock = StepClock(device)
        with method.apply(model) as handle:
            start = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, stopping_criteria=[clock])
            total_s += time.perf_counter() - start
            exits = _host(handle.exit_layers) if handle is not None and handle.exit_layers is not None else None
            monitor = getattr(handle, "shift_monitor", None)  # learned exits: the scores of this batch's rows
            if monitor is not None:
                pooled = pooled or ScoreMonitor(monitor.num_heads, monitor.reference, window=None)
                pooled.extend(monitor)
            # pruning handles say what the LLM received (fed_*) and how many visual tokens stay after the exit
            fed = {
                "fed_tokens": None if handle is None else _host(handle.fed_tokens),
                "fed_visual": None if handle is None else _host(handle.fed_visual),
                "visual_after": None if handle is None else _host(handle.visual_after),
            }
        prefill_s += clock.stamps[0] - start
        batch_ms.append(1e3 * (clock.stamps[0] - start) / len(records))
        if exits is None:
            exits = torch.full((len(records),), spec.num_layers)
        texts = processor.tokenizer.batch_decode(out[:, host["input_ids"].shape[1] :].cpu(), skip_special_tokens=True)
        predicted = [normalize_answer(t) for t in texts]
        ids, mask = host["input_ids"], host["attention_mask"]  # on the host, as spec.visual_ids
        visual = torch.isin(ids, spec.visual_ids).sum(1)
        tokens = mask.sum(1)
        fed_tokens = tokens if fed["fed_tokens"] is None else fed["fed_tokens"]
        fed_visual = visual if fed["fed_visual"] is None else fed["fed_visual"]
        flops = prefill_flops(model.config, fed_tokens, fed_visual, exits, visual_after=fed["visual_after"]).flops
        relative = flops / prefill_flops(model.config, tokens, visual).full  # relative to the unpruned full model
        kv = prefill_kv_bytes(
            model.config, fed_tokens, fed_visual, exits, visual_after=fed["visual_after"], bytes_per_value=item_bytes
        )
        first = len(answers)
        for row, record in enumerate(records):
            pred = predicted[row]
            ref = reference.answers[first + row] if reference is not None else pred
            where = f"record {first + row}"
            correct = torch.tensor([pred == normalize_answer(gold_text(record["answer"], where))])
            agree = torch.tensor([pred == ref])
            for group in {OVERALL, str(record.get("qtype", OVERALL))}:
                meters[group].update(correct, agree, relative[row : row + 1], exits[row : row + 1], kv[row : row + 1])
        answers.extend(predicted)
        exits_all.extend(int(e) for e in exits)
        flops_all.extend(float(r) for r in relative)
        qtypes.extend(str(r.get("qtype", OVERALL)) for r in records)
    metrics = {group: meter.compute() for group, meter in sorted(meters.items())}
    metrics[OVERALL]["prefill_ms"] = 1e3 * prefill_s / len(answers)
    metrics[OVERALL]["total_ms"] = 1e3 * total_s / len(answers)
    p10, p90 = torch.tensor(batch_ms, dtype=torch.float64).quantile(torch.tensor([0.1, 0.9], dtype=torch.float64))
    metrics[OVERALL]["prefill_ms_p10"], metrics[OVERALL]["prefill_ms_p90"] = float(p10), float(p90)
    shift = None
    if pooled is not None and pooled.reference is not None:
        report = pooled.report()
        shift = report.to_dict()
        logger.info("%s: %s", method.name, report.summary())
    return EvalResult(method.name, metrics, answers, exits_all, flops_all, qtypes, shift)


def _host(value: Any) -> Any:
    """A tensor copied to the host (a detached clone, so later writes on the handle cannot change it); other values
    (``None``, lists) as they are."""
    return value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value


def oracle_exit(full: EvalResult, static: dict[int, EvalResult]) -> tuple[list[int], list[float]]:
    """Each sample's smallest safe exit layer and the FLOPs of exiting there (the per-sample oracle).

    A layer K is safe for a sample when withdrawal at every K' >= K gives the full model's answer.

    Args:
        full: the full model's result.
        static: results of static withdrawal at every K = 0..L (same samples, same order).

    Returns:
        Per sample: the smallest safe layer, and the relative prefill FLOPs at it.
    """
    num_layers = max(static)
    if sorted(static) != list(range(num_layers + 1)):
        raise ValueError("the oracle needs static results for every K = 0..L")
    layers, flops = [], []
    for i, answer in enumerate(full.answers):
        layer = num_layers
        while layer > 0 and static[layer - 1].answers[i] == answer:
            layer -= 1
        layers.append(layer)
        flops.append(static[layer].relative_flops[i] if layer < num_layers else 1.0)
    return layers, flops


def format_histogram(layers: list[int], qtypes: list[str], num_layers: int) -> str:
    """Markdown table: how many samples have each smallest safe layer, per question type."""
    types = sorted(set(qtypes))
    lines = [
        "| type | " + " | ".join(f"K={k}" for k in range(num_layers + 1)) + " | mean |",
        "|---" * (num_layers + 3) + "|",
    ]
    for t in [*types, OVERALL]:
        chosen = [k for k, q in zip(layers, qtypes, strict=True) if t in (q, OVERALL)]
        counts = [chosen.count(k) for k in range(num_layers + 1)]
        lines.append(f"| {t} | " + " | ".join(map(str, counts)) + f" | {sum(chosen) / max(len(chosen), 1):.2f} |")
    return "\n".join(lines)


def format_table(results: list[EvalResult], unreliable: bool = False) -> str:
    """Markdown table, one row per result: overall accuracy, agreement, exit layers, FLOPs and time.

    ``unreliable`` marks the two timing columns' headers "(unreliable)" (:func:`dyvte.eval.timing.check_timings`).
    """
    mark = " (unreliable)" if unreliable else ""
    lines = [
        "| method | accuracy | agreement | exit mean (p10/p50/p90) | rel. prefill FLOPs | "
        f"prefill ms/sample{mark} | total ms/sample{mark} |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r.metrics[OVERALL]
        lines.append(
            f"| {r.method} | {m['accuracy']:.3f} | {m['agreement']:.3f} | {m['exit_mean']:.2f} "
            f"({m['exit_p10']:.0f}/{m['exit_p50']:.0f}/{m['exit_p90']:.0f}) | {m['relative_flops']:.3f} | "
            f"{m['prefill_ms']:.1f} | {m['total_ms']:.1f} |"
        )
    return "\n".join(lines)


def format_per_type(results: list[EvalResult], key: str = "accuracy") -> str:
    """Markdown table of one metric per question type (columns) for each result (rows)."""
    types = sorted({t for r in results for t in r.metrics if t != OVERALL})
    lines = ["| method | " + " | ".join([*types, OVERALL]) + " |", "|---" * (len(types) + 2) + "|"]
    for r in results:
        cells = [f"{r.metrics[t][key]:.3f}" if t in r.metrics else "-" for t in [*types, OVERALL]]
        lines.append(f"| {r.method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def method_kind(name: str) -> str:
    """The family a method's name belongs to (its first word; ``A + B`` for composed methods)."""
    return " + ".join(part.split(" ")[0] for part in name.split(" + "))


def plot_sweep(results: list[EvalResult], path: str | Path, title: str = "accuracy vs prefill FLOPs") -> None:
    """PNG: overall accuracy against mean relative prefill FLOPs; one series per method family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[EvalResult]] = defaultdict(list)
    for r in results:
        series[method_kind(r.method)].append(r)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for family, points in series.items():
        points = sorted(points, key=lambda r: r.flops)
        ax.plot([p.flops for p in points], [p.accuracy for p in points], marker="o", label=family)
        if family == "static":
            for p in points:
                ax.annotate(
                    p.method.split("=")[-1],
                    (p.flops, p.accuracy),
                    fontsize=7,
                    xytext=(3, -9),
                    textcoords="offset points",
                )
    ax.set_xlabel("prefill FLOPs relative to the full model (text decoder)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:  # the format is named: the temporary file's suffix is not .png
            fig.savefig(tmp, dpi=120, format=Path(path).suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
