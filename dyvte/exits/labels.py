"""DyVTE labels: is withdrawing at exit layer K safe for a sample?

The rule (DyVTE): with the ground-truth answer teacher-forced, withdrawal at K is safe when the withdrawn model's
argmax tokens agree with the full model's on more than ``agree`` (99%) of the answer positions AND its answer loss
is at most ``loss_ratio`` (1.03) times the full model's (``<=`` rather than ``<`` so that identical predictions are
always safe, even at zero loss). The rule and the other per-sample measures on logits are in
:mod:`dyvte.exits.safety` (re-exported here); this module runs the model to get them.

Two ways to get labels:

* :func:`build_label_cache` (default for training): every K = 0..L-1 for every sample, plus the heads' inputs at every
  layer, computed once and stored with ``datasets``; head training afterwards never runs the MLLM.
* :func:`on_the_fly_labels` (as the paper did): one random K per step, full and withdrawn copies of the batch in one
  forward (per-row exit layers), one label per sample per step.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dyvte.data.records import answer_token_ids, build_inputs, iter_batches, teacher_force
from dyvte.engine.compat import HIDDEN_STATES, POSITION_EMBEDDINGS, hidden_states_of, logit_lens, logits_of
from dyvte.engine.registry import ModelSpec, resolve, unwrap
from dyvte.exits.branching import Branches
from dyvte.exits.safety import (
    answer_argmax_equal,
    answer_kl,
    answer_loss,
    exit_safe,
    final_prompt_slot,
    smallest_safe_layer,
)
from dyvte.policies.exit_heads import head_features, visual_pool
from dyvte.policies.withdraw import withdraw
from dyvte.utils.checks import check_positive_int
from dyvte.utils.devices import model_device, to_device
from dyvte.utils.modes import eval_mode

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = [
    "LABEL_FORMAT",
    "answer_kl",
    "answer_loss",
    "build_label_cache",
    "exit_safe",
    "label_batch",
    "label_features",
    "on_the_fly_labels",
    "smallest_safe_layer",
]

logger = logging.getLogger(__name__)


def _greedy_answers(model: nn.Module, prompt: dict, eos_id: int, max_new_tokens: int) -> list[torch.Tensor]:
    """The full model's greedy answer of each row: its generated ids up to and including the first end token."""
    out = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, prompt["input_ids"].shape[1] :].cpu()  # (B, <= max_new_tokens)
    answers = []
    for row in new:
        ends = (row == eos_id).nonzero()
        answers.append(row[: int(ends[0]) + 1] if len(ends) else row)
    return answers


#: generation settings under which greedy decoding is the argmax of the logits at every step (``generate`` applies
#: no logits processor that could change it), with their neutral values
_PLAIN_GREEDY = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "sequence_bias": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "begin_suppress_tokens": (None,),
    "exponential_decay_length_penalty": (None,),
}


def _argmax_is_greedy(model: nn.Module) -> bool:
    """Whether ``model.generate(do_sample=False)`` writes the argmax token at every step (its generation config sets
    no logits processor that could change it; suppressed tokens are checked per answer)."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return True
    return all(getattr(config, name, None) in neutral for name, neutral in _PLAIN_GREEDY.items())


def _stop_ids(model: nn.Module, eos_id: int) -> set[int]:
    """The token ids that end a greedy answer: the tokenizer's end token and the generation config's."""
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]
    return {eos_id, *(int(i) for i in ids if i is not None)}


class _AttentionProbe:
    """Captures the input hidden states and rotary embeddings of decoder layers 1..L-1 during one forward."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self.inputs: dict[int, tuple[torch.Tensor, tuple | None]] = {}
        self._hooks = [
            layer.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, layer in enumerate(layers) if i > 0
        ]

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs[HIDDEN_STATES]
            self.inputs[index] = (hidden, kwargs.get(POSITION_EMBEDDINGS))

        return hook

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def _extras(
    spec, model: nn.Module, hidden_states: tuple, probe: _AttentionProbe, visual, valid, final, rows: int
) -> torch.Tensor:
    """``(B, L-1, 3)`` float32 extra inputs of head j (ablation, docs/report.md): the final prompt token's logit lens
    after layer j (top-1 probability, entropy in nats) and the attention mass layer j+1 would give the visual
    tokens from that token (one query row from the layer's own q/k, mean over heads; ``nan`` when the layer gets
    no rotary embeddings or has no attention, as a linear-attention layer)."""
    from dyvte.policies.fastv import last_token_attention

    norm, head = logit_lens(model, spec.decoder)
    batch = torch.arange(rows, device=visual.device)
    slots = torch.arange(visual.shape[1], device=visual.device)[None]
    allowed = valid[:rows] & (slots <= final[:, None])
    out = torch.full((rows, spec.num_layers - 1, 3), float("nan"))
    for j in range(spec.num_layers - 1):
        state = hidden_states[j + 1][:rows][batch, final]  # (B, d)
        probs = head(norm(state)).float().softmax(-1)  # (B, V)
        out[:, j, 0] = probs.amax(-1)
        out[:, j, 1] = -(probs * probs.clamp(min=1e-30).log()).sum(-1)
        hidden, rotary = probe.inputs.get(j + 1, (None, None))
        if rotary is not None and not (spec.linear_attention and spec.linear_attention[j + 1]):
            cos, sin = (t[:rows] if t.shape[0] > 1 else t for t in rotary)
            attention = last_token_attention(spec.layers[j + 1], hidden[:rows], (cos, sin), allowed, query=final)
            out[:, j, 2] = (attention * visual[:rows]).sum(1)
    return out


def label_batch(
    model: nn.Module,
    processor,
    records: list[dict],
    *,
    offset: int = 0,
    agree: float = 0.99,
    loss_ratio: float = 1.03,
    max_new_tokens: int = 8,
    branch: bool = True,
    visual_inputs: bool = False,
) -> dict[str, np.ndarray]:
    """Everything the exit heads learn from and are calibrated and scored on, for one batch of records.

    The gold answers (with their end token) are teacher-forced through the full model and through withdrawal at
    every K = 0..L-1: this gives per-layer correctness, the paper's rule and the head inputs. Greedy decoding writes
    the gold answer exactly where the full model's argmax is the gold token at every answer position (and the answer
    fits ``max_new_tokens``); for those rows the gold forcing is also the forcing of the full model's own answer, and
    ``match`` / ``kl`` come from the same forwards. Only the other rows are decoded with ``generate`` and forced a
    second time with their greedy answer. Agreement under this forcing is exact: the withdrawn model's greedy answer
    equals the full model's iff its argmax equals the forced token at every answer position. (A generation config
    with logits processors that can change the argmax, e.g. a repetition penalty, sends every row through
    ``generate``.)

    Args:
        model: the frozen MLLM (unwrapped, in eval mode).
        processor: its processor.
        records: records with ``image``, ``question``, ``answer`` (and ``qtype``).
        offset: index of the first record in its dataset (for error messages).
        agree: the paper's agreement threshold (:func:`exit_safe`).
        loss_ratio: the paper's loss-ratio threshold (:func:`exit_safe`).
        max_new_tokens: greedy answer length bound (as in :func:`dyvte.eval.harness.evaluate`).
        branch: run each withdrawn forward as a branch of the full one (:class:`dyvte.exits.branching.Branches`:
            layers ``0..K-1`` and the vision encoder are replayed, about two full forwards for all K together);
            ``False`` runs the whole withdrawn model once per K (``L + 1`` forwards; the same labels, for comparison).
        visual_inputs: also return ``visual_features`` ``(B, L-1, 2d)``: the visual tokens' pooled states after each
            layer (:func:`dyvte.policies.exit_heads.visual_pool`), what heads with ``visual_inputs`` read besides
            ``features``.

    Returns:
        Columns, one row per record (``L`` decoder layers, ``d`` hidden size):
        ``features`` ``(B, L-1, 2d)`` head inputs; ``extras`` ``(B, L-1, 3)`` (see :func:`_extras`);
        ``match`` ``(B, L)`` withdrawal at K gives the full model's greedy answer; ``correct`` ``(B, L+1)`` the
        answer at K (K = L: the full model) equals the gold answer; ``kl`` ``(B, L)`` mean answer-position
        ``KL(P_withdrawn || P_full)`` under the full model's answer; ``dyvte`` ``(B, L)`` the paper's rule on the
        gold answer; ``tokens`` / ``visual`` ``(B,)`` prompt and visual token counts (for FLOPs).
    """
    spec = resolve(model)
    device = model_device(model)  # inputs follow the model (a rank's GPU under DDP); results come back
    prompt = build_inputs(processor, records, offset=offset, dtype=model.dtype)  # (B, T) on the host
    gold = answer_token_ids(processor, records, offset)
    forced = to_device(teacher_force(processor, prompt, gold, model.dtype), device)
    labels = forced.pop("labels")  # (B, T')
    columns, same = _forced_columns(spec, model, forced, labels, branch, agree, loss_ratio, visual_inputs)
    suppressed = set(getattr(model.generation_config, "suppress_tokens", None) or [])
    plain = _argmax_is_greedy(model)
    stops = _stop_ids(model, processor.tokenizer.eos_token_id)
    for b, answer in enumerate(gold):  # rows whose greedy answer is not certainly the gold one
        ids = answer.tolist()
        fits = len(ids) <= max_new_tokens and not suppressed.intersection(ids) and not stops.intersection(ids[:-1])
        same[b] &= plain and fits
    differ = [b for b in range(len(records)) if not same[b]]
    if differ:
        subset = [records[b] for b in differ]
        sub_prompt = to_device(build_inputs(processor, subset, offset=offset, dtype=model.dtype), device)
        greedy = _greedy_answers(model, sub_prompt, processor.tokenizer.eos_token_id, max_new_tokens)
        sub_forced = to_device(teacher_force(processor, sub_prompt, greedy, model.dtype), device)
        sub_labels = sub_forced.pop("labels")
        match, kl = _match_columns(spec, model, sub_forced, sub_labels, branch)
        rows = torch.tensor(differ)
        columns["match"][rows], columns["kl"][rows] = match, kl
    tokens = prompt["attention_mask"].sum(1)
    visual = torch.isin(prompt["input_ids"], spec.visual_ids.to(prompt["input_ids"].device)).sum(1)
    return {
        **{key: value.numpy() for key, value in columns.items()},
        "tokens": tokens.numpy(),
        "visual": visual.numpy(),
    }


def _forwards(spec: ModelSpec, model: nn.Module, forced: dict, branch: bool, probe: bool = False):
    """A context that runs the full forward of ``forced`` (hidden states recorded) and yields ``(out, withdrawn,
    probe)``, where ``withdrawn(layer, window)`` gives ``(B, W, V)`` logits of the last ``window`` input positions
    under withdrawal at ``layer`` (a branch of the full forward, or the whole withdrawn model)."""

    @contextlib.contextmanager
    def run():
        with contextlib.ExitStack() as stack:
            branches = stack.enter_context(Branches(model)) if branch else None
            attention = _AttentionProbe(spec.layers) if probe else None
            try:
                full = branches.full if branches is not None else lambda inputs, **kw: model(**inputs, **kw)
                out = full(forced, output_hidden_states=True)
            finally:
                if attention is not None:
                    attention.remove()

            def withdrawn(layer: int, window: int) -> torch.Tensor:
                if branches is not None:
                    return branches.withdrawn(layer, last=window)
                with withdraw(model, layer=layer) as handle:
                    return handle.to_input_positions(logits_of(model(**forced)))[:, -window:]

            yield out, withdrawn, attention

    return run()


def _window(labels: torch.Tensor) -> int:
    """The last ``W`` input columns hold every answer position (answers end each row): what the rules read."""
    return min(int((labels != -100).sum(1).max()) + 1, labels.shape[1])


def _forced_columns(
    spec: ModelSpec,
    model: nn.Module,
    forced: dict,
    labels: torch.Tensor,
    branch: bool,
    agree: float,
    loss_ratio: float,
    visual_inputs: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """:func:`label_batch`'s columns from the gold-forced batch: head inputs, ``correct``, ``dyvte``, and ``match`` /
    ``kl`` as if the gold answer were the full model's (right where it is); with ``(B,)`` bool: the full model's argmax
    is the gold token at every answer position."""
    num_layers, rows = spec.num_layers, labels.shape[0]
    with _forwards(spec, model, forced, branch, probe=True) as (out, withdrawn, probe):
        full_logits, states = logits_of(out), hidden_states_of(out)  # (B, T, V), L + 1 x (B, T, d)
        visual = torch.isin(forced["input_ids"], spec.visual_ids.to(labels.device))
        valid = forced["attention_mask"].bool()
        final = final_prompt_slot(labels)
        features = torch.stack(
            [head_features(states[j + 1], visual, valid, final) for j in range(num_layers - 1)], dim=1
        )  # (B, L-1, 2d)
        pooled = (
            torch.stack([visual_pool(states[j + 1], visual, valid) for j in range(num_layers - 1)], dim=1)
            if visual_inputs
            else None
        )  # (B, L-1, 2d)
        extras = _extras(spec, model, states, probe, visual, valid, final, rows)
        match = torch.ones(rows, num_layers, dtype=torch.bool)
        correct = torch.ones(rows, num_layers + 1, dtype=torch.bool)
        kl = torch.zeros(rows, num_layers)
        paper = torch.ones(rows, num_layers, dtype=torch.bool)
        same = answer_argmax_equal(full_logits, labels).cpu()
        correct[:, num_layers] = same
        window = _window(labels)
        labels, full_logits = labels[:, -window:], full_logits[:, -window:]  # (B, W), (B, W, V)
        for layer in range(num_layers):
            logits = withdrawn(layer, window)  # (B, W, V)
            correct[:, layer] = match[:, layer] = answer_argmax_equal(logits, labels).cpu()
            kl[:, layer] = answer_kl(full_logits, logits, labels).cpu()
            paper[:, layer] = exit_safe(full_logits, logits, labels, agree, loss_ratio).cpu()
    columns = {
        "features": features.float().cpu(),
        "extras": extras,
        "match": match,
        "correct": correct,
        "kl": kl,
        "dyvte": paper,
    }
    if pooled is not None:
        columns["visual_features"] = pooled.float().cpu()
    return columns, same.clone()


def _match_columns(
    spec: ModelSpec, model: nn.Module, forced: dict, labels: torch.Tensor, branch: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``match`` ``(B, L)`` and ``kl`` ``(B, L)`` of rows forced with the full model's own greedy answer."""
    num_layers, rows = spec.num_layers, labels.shape[0]
    match = torch.ones(rows, num_layers, dtype=torch.bool)
    kl = torch.zeros(rows, num_layers)
    with _forwards(spec, model, forced, branch) as (out, withdrawn, _):
        window = _window(labels)
        labels, full_logits = labels[:, -window:], logits_of(out)[:, -window:]
        for layer in range(num_layers):
            logits = withdrawn(layer, window)
            match[:, layer] = answer_argmax_equal(logits, labels).cpu()
            kl[:, layer] = answer_kl(full_logits, logits, labels).cpu()
    return match, kl


def label_features(num_layers: int, width: int, visual_inputs: bool = False):
    """The ``datasets`` schema of a label cache (:func:`label_batch`'s columns plus ``qtype`` and ``index``)."""
    from datasets import Array2D, Features, Sequence, Value  # lazy: only the label cache needs datasets

    visual = {"visual_features": Array2D((num_layers - 1, width), "float32")} if visual_inputs else {}
    return Features(
        {
            "features": Array2D((num_layers - 1, width), "float32"),
            **visual,
            "extras": Array2D((num_layers - 1, 3), "float32"),
            "match": Sequence(Value("bool"), length=num_layers),
            "correct": Sequence(Value("bool"), length=num_layers + 1),
            "kl": Sequence(Value("float32"), length=num_layers),
            "dyvte": Sequence(Value("bool"), length=num_layers),
            "tokens": Value("int32"),
            "visual": Value("int32"),
            "qtype": Value("string"),
            "index": Value("int64"),
        }
    )


#: version of the label cache's columns (part of the cache key: older caches are labelled again)
LABEL_FORMAT = 2


@torch.no_grad()
def build_label_cache(
    model: nn.Module,
    processor,
    dataset,
    *,
    batch_size: int = 32,
    agree: float = 0.99,
    loss_ratio: float = 1.03,
    max_new_tokens: int = 8,
    progress: bool = True,
    on_batch: Callable[[int, float], None] | None = None,
    visual_inputs: bool = False,
) -> Dataset:
    """:func:`label_batch` over a dataset, once per sample, as a ``datasets.Dataset``.

    Args:
        model: the frozen MLLM.
        processor: its processor.
        dataset: records with ``image``, ``question``, ``answer`` (and ``qtype``).
        batch_size: rows per forward.
        agree: see :func:`exit_safe`.
        loss_ratio: see :func:`exit_safe`.
        max_new_tokens: greedy answer length bound.
        progress: show a progress bar.
        on_batch: called after each batch with its number of records and seconds (a caller's progress bar).
        visual_inputs: also keep ``visual_features``, the inputs heads with ``visual_inputs`` read (as many floats
            again as ``features``).

    Returns:
        The columns of :func:`label_batch` plus ``qtype`` and ``index`` (row in ``dataset``); every label rule of
        :mod:`dyvte.exits.rules` is computed from them without running the model again.

    The model runs in eval mode (a model in training mode is switched, with a warning, and restored afterwards):
    dropout would make the labels and features random.
    """
    if len(dataset) == 0:
        raise ValueError("build_label_cache: the dataset is empty (no record to label)")
    check_positive_int("build_label_cache: batch_size", batch_size)
    check_positive_int("build_label_cache: max_new_tokens", max_new_tokens)
    with eval_mode(model, "build_label_cache (labelling)"):
        return _build_label_cache(
            unwrap(model),
            processor,
            dataset,
            batch_size,
            agree,
            loss_ratio,
            max_new_tokens,
            progress,
            on_batch,
            visual_inputs,
        )


def _build_label_cache(
    model: nn.Module,
    processor,
    dataset,
    batch_size: int,
    agree: float,
    loss_ratio: float,
    max_new_tokens: int,
    progress: bool,
    on_batch: Callable[[int, float], None] | None,
    visual_inputs: bool = False,
) -> Dataset:
    from datasets import Dataset

    spec = resolve(model)
    columns: dict[str, list] = defaultdict(list)
    start_time = time.perf_counter()
    total = (len(dataset) + batch_size - 1) // batch_size
    batches = iter_batches(dataset, batch_size, answers=True, processor=processor)
    for b, records in enumerate(tqdm(batches, total=total, desc="labels", disable=not progress)):
        began = time.perf_counter()
        batch = label_batch(
            model,
            processor,
            records,
            offset=b * batch_size,
            agree=agree,
            loss_ratio=loss_ratio,
            max_new_tokens=max_new_tokens,
            visual_inputs=visual_inputs,
        )
        for key, value in batch.items():
            columns[key].extend(value)
        columns["qtype"].extend(str(r.get("qtype", "all")) for r in records)
        columns["index"].extend(range(b * batch_size, b * batch_size + len(records)))
        if on_batch is not None:
            on_batch(len(records), time.perf_counter() - began)
    elapsed = time.perf_counter() - start_time
    logger.info("labels for %d samples in %.1f s (%.1f ms/sample)", len(dataset), elapsed, 1e3 * elapsed / len(dataset))
    schema = label_features(spec.num_layers, 2 * spec.text_config.hidden_size, visual_inputs)
    return Dataset.from_dict(dict(columns), features=schema)


@torch.no_grad()
def on_the_fly_labels(
    model: nn.Module, inputs: dict, layer: int, agree: float = 0.99, loss_ratio: float = 1.03
) -> tuple[torch.Tensor, torch.Tensor]:
    """One exit layer's labels and head inputs, the paper's way: full and withdrawn copies in one forward.

    Args:
        model: the frozen MLLM.
        inputs: teacher-forced model inputs with ``labels`` (from ``dyvte.data.records.build_inputs(...,
        with_answers=True)``).
        layer: exit layer K in ``[1, L-1]`` (head ``K - 1``).
        agree: see :func:`exit_safe`.
        loss_ratio: see :func:`exit_safe`.

    Returns:
        ``(features (B, 2d), safe (B,))`` for head ``layer - 1``.

    The model runs in eval mode (a model in training mode is switched, with a warning, and restored afterwards).
    """
    with eval_mode(model, "on_the_fly_labels (labelling)"):
        return _on_the_fly_labels(unwrap(model), inputs, layer, agree, loss_ratio)


def _on_the_fly_labels(
    model: nn.Module, inputs: dict, layer: int, agree: float, loss_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    spec = resolve(model)
    if not 1 <= layer < spec.num_layers:
        raise ValueError(f"on-the-fly labels need an exit layer in [1, {spec.num_layers - 1}], got {layer}")
    device = model_device(model)
    inputs = to_device(inputs, device)  # the caller's batch, built on the host, follows the model
    labels = inputs.pop("labels")
    batch = labels.shape[0]
    # every tensor input (per-token or per-image) is repeated: rows 0..B-1 full, B..2B-1 withdrawn
    doubled = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    rows = [spec.num_layers] * batch + [layer] * batch  # first copy: full model, second: withdrawn at K
    with withdraw(model, layer=rows) as handle:
        out = model(**doubled, output_hidden_states=True)
        logits = handle.to_input_positions(logits_of(out))  # (2B, T, V)
    visual = torch.isin(inputs["input_ids"], spec.visual_ids.to(device))
    hidden = hidden_states_of(out)[layer][:batch]  # output of layer K-1 for the full copies: (B, T, d)
    features = head_features(hidden, visual, inputs["attention_mask"].bool(), final_prompt_slot(labels))
    return features, exit_safe(logits[:batch], logits[batch:], labels, agree, loss_ratio)
