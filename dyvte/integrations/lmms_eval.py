"""The lmms-eval model ``dyvte``: any supported HF model under a dyvte method, inside the real lmms-eval harness.

``python -m lmms_eval --model dyvte --model_args pretrained=DIR,method=METHOD[,...] --tasks ...`` (lmms-eval 0.7,
installed by ``train/install_lmms_eval.sh``; the entry point ``dyvte`` of the group ``lmms_eval.models`` in
``pyproject.toml`` registers it, :mod:`dyvte.integrations.lmms_entry`).

``--model_args`` (comma-separated ``key=value``; a piece without ``=`` continues the previous value, so
``method=static:4,6`` reads as one value and is then refused as two methods):

* ``pretrained``: ``demo`` or a local ``from_pretrained`` directory (or peft adapter), as ``train/evaluate.py --model``.
* ``method``: one method string of :func:`dyvte.eval.methods.parse_method`: ``full``, ``static:K``,
  ``calibrated:DIR``, ``heads:DIR[:P]``, ``fastervlm:R``, ``random:R``, ``fastv:K:R``, ``A+B``; checked against the
  model (:func:`dyvte.eval.methods.check_method`) before any request runs.
* ``batch_size`` (default: lmms-eval's ``--batch_size``, else 1): requests per ``generate`` call, each row exiting
  at its own layer.
* ``max_new_tokens``: overrides the task's ``generation_kwargs`` (default: the task's, else 8, the harness's).
* ``dtype`` (``float32``), ``device`` (default: lmms-eval's ``--device``, else where the model loads),
  ``allow_other_model`` (``true``: run exit heads / calibrations saved for another model, with a warning).
* ``stats_path``: a JSONL file to write, one line per request (task, split, doc_id, exit layer, prefill FLOPs
  relative to the full model, visual tokens fed, tokens fed), plus ``<stats_path without .jsonl>.means.json`` with
  their means per task. lmms-eval's own ``--log_samples`` has no field for them; the means are also logged.

Prompts are built exactly as dyvte's harness builds them for a record ``{image, question}``: the task's
``doc_to_text`` is the question, the single image of ``doc_to_visual`` the image, through
:func:`dyvte.data.records.build_inputs` (the processor's chat template with its image placeholder, left padding).
Decoding is greedy, as in the harness; the answer is cut at the first of the task's ``until`` strings.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model
from PIL import Image

from dyvte.data.errors import DataError
from dyvte.data.records import build_inputs, teacher_force
from dyvte.data.sources import load_config, load_model
from dyvte.engine.registry import resolve, unwrap
from dyvte.eval.flops import prefill_flops
from dyvte.eval.methods import MethodError, check_method, method_forms, parse_method
from dyvte.eval.methods import allow_other_model as allow_other
from dyvte.integrations.lmms_entry import MODEL_ID
from dyvte.utils.devices import model_device, to_device
from dyvte.utils.io import check_writable, write_text_atomic
from dyvte.utils.modes import eval_mode

__all__ = ["DyVTELMM", "parse_model_args"]

logger = logging.getLogger(__name__)

#: the ``--model_args`` keys the model takes
MODEL_ARGS = (
    "pretrained",
    "method",
    "batch_size",
    "max_new_tokens",
    "dtype",
    "device",
    "allow_other_model",
    "stats_path",
)
#: the harness's default generation length (``dyvte.evaluate``)
DEFAULT_MAX_NEW_TOKENS = 8


def parse_model_args(text: str) -> dict[str, str]:
    """``key=value,key=value`` as a dict of strings; a piece without ``=`` continues the previous value (``method=
    static:4,6`` is ``{"method": "static:4,6"}``).

    Raises:
        ValueError: a piece before any ``key=``, an empty key, or a key given twice.
    """
    args: dict[str, str] = {}
    last: str | None = None
    for piece in (text or "").split(","):
        key, eq, value = piece.partition("=")
        if not eq:
            if last is None:
                if not piece.strip():
                    continue
                raise ValueError(f"--model_args {text!r}: {piece!r} is not key=value")
            args[last] += "," + piece
            continue
        key = key.strip()
        if not key:
            raise ValueError(f"--model_args {text!r}: an empty key in {piece!r}")
        if key in args:
            raise ValueError(f"--model_args {text!r}: {key} is given twice")
        args[key], last = value.strip(), key
    return args


def _int_arg(name: str, value: Any) -> int:
    """A positive int from a model arg (``"8"``, ``8``); ``ValueError`` naming it otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"dyvte model_args: {name} must be an int >= 1, got {value!r}")
    try:
        number = int(str(value).strip())
    except ValueError:
        number = 0
    if number < 1:
        hint = " (dyvte does not search batch sizes: give N)" if str(value).startswith("auto") else ""
        raise ValueError(f"dyvte model_args: {name} must be an int >= 1, got {value!r}{hint}")
    return number


def _bool_arg(name: str, value: Any) -> bool:
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ValueError(f"dyvte model_args: {name} must be true or false, got {value!r}")


@register_model(MODEL_ID)
class DyVTELMM(lmms):
    """lmms-eval's model ``dyvte`` (see the module docstring for its ``--model_args``)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str = "demo",
        method: str = "full",
        batch_size: int | str = 1,
        max_new_tokens: int | str | None = None,
        dtype: str = "float32",
        device: str | None = None,
        allow_other_model: bool | str = False,
        stats_path: str | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        unknown.pop("max_batch_size", None)  # lmms-eval always passes it (for --batch_size auto)
        if unknown:
            raise ValueError(
                f"dyvte model_args: unknown {', '.join(sorted(unknown))}; expected some of {', '.join(MODEL_ARGS)}"
            )
        self.batch_size = _int_arg("batch_size", batch_size)
        self.max_new_tokens = None if max_new_tokens in (None, "") else _int_arg("max_new_tokens", max_new_tokens)
        self.stats_path = Path(stats_path) if stats_path else None
        other = _bool_arg("allow_other_model", allow_other_model)
        if not isinstance(method, str) or not method.strip():
            raise MethodError(f"dyvte model_args: method is empty; expected one of {_forms()}")
        self.method_spec = method.strip()
        if self.stats_path is not None:
            check_writable(self.stats_path.parent, "dyvte model_args: stats_path's folder")
        # the method string first, against the config's depth (no weights read), so that a typo costs no model load
        depth = load_config(str(pretrained)).get_text_config().num_hidden_layers
        methods = parse_method(self.method_spec, depth)
        model, self.processor = load_model(str(pretrained), str(dtype), device=device or None)
        self.model = unwrap(model)  # as the harness runs it (a peft model's adapters stay in its layers)
        self.spec = resolve(self.model)
        if self.spec.num_layers != depth:
            methods = parse_method(self.method_spec, self.spec.num_layers)
        if len(methods) != 1:
            raise MethodError(
                f"method {self.method_spec!r} gives {len(methods)} methods ({', '.join(m.name for m in methods)}); "
                "lmms-eval runs one model per run: give one method per run"
            )
        self.method = allow_other(methods[0]) if other else methods[0]
        check_method(self.method, self.model, self.method_spec, self.processor)
        self.device = model_device(self.model)
        #: one dict per request answered (task, split, doc_id, request, exit_layer, relative_flops, ...)
        self.sample_stats: list[dict[str, Any]] = []
        self._warned_sampling = False
        logger.info("dyvte: %s under %s, batch size %d", pretrained, self.method.name, self.batch_size)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> DyVTELMM:
        """The model from ``--model_args`` (:func:`parse_model_args`); lmms-eval's ``--batch_size`` / ``--device``
        fill what the model args leave out (lmms-eval's own parser would pass ``batch_size`` twice)."""
        args = parse_model_args(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    # ------------------------------------------------------------------------------------------- requests

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _record(self, question: str, doc_to_visual, task: str, split: str, doc_id: int) -> dict[str, Any]:
        """The harness's record for one request: the question and the document's single image."""
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else []
        flat = [v for item in (visuals or []) for v in (item if isinstance(item, list | tuple) else [item])]
        if len(flat) != 1 or not isinstance(flat[0], Image.Image):
            kinds = ", ".join(type(v).__name__ for v in flat) or "none"
            raise DataError(
                f"lmms-eval task {task!r}, split {split!r}, doc {doc_id}: dyvte's lmms-eval model answers one image "
                f"per question, got {len(flat)} visuals ({kinds}); video and multi-image tasks are not supported"
            )
        return {"image": flat[0], "question": question}

    def _generation_length(self, gen_kwargs: dict[str, Any]) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        value = gen_kwargs.get("max_new_tokens")
        return DEFAULT_MAX_NEW_TOKENS if value is None else _int_arg("the task's max_new_tokens", value)

    def _check_greedy(self, gen_kwargs: dict[str, Any]) -> None:
        sampling = bool(gen_kwargs.get("do_sample")) or float(gen_kwargs.get("temperature") or 0) > 0
        if sampling and not self._warned_sampling:
            logger.warning("dyvte decodes greedily (as its harness measures); the task's sampling settings are ignored")
            self._warned_sampling = True

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Greedy answers, in request order, batched ``batch_size`` at a time among requests that share their
        generation settings; each row exits at its own layer. Request args: ``(context, gen_kwargs, doc_to_visual,
        doc_id, task, split)``."""
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            gen_kwargs = dict(request.args[1] or {})
            self._check_greedy(gen_kwargs)
            until = gen_kwargs.get("until") or []
            key = json.dumps([self._generation_length(gen_kwargs), [until] if isinstance(until, str) else until])
            groups[key].append(i)
        with eval_mode(self.model, "lmms-eval dyvte"):
            for key, indices in groups.items():
                length, until = json.loads(key)
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    texts = self._generate([requests[i].args for i in chunk], length)
                    for i, text in zip(chunk, texts, strict=True):
                        answers[i] = _cut(text, until)
        self._write_stats()
        return answers  # type: ignore[return-value]

    @torch.no_grad()
    def _generate(self, args: list[tuple], max_new_tokens: int) -> list[str]:
        """One batch through ``generate`` under the method; records each row's measurements."""
        records = [self._record(a[0], a[2], a[4], a[5], a[3]) for a in args]
        host = build_inputs(self.processor, records, dtype=self.model.dtype)
        inputs = to_device(host, self.device)
        with self.method.apply(self.model) as handle:
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            measured = _measured(handle)
        new = out[:, host["input_ids"].shape[1] :].cpu()
        texts = self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        self._record_stats("generate_until", args, host, measured)
        return texts

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """``(log p(continuation | prompt), whether greedy decoding gives it)`` per request, under the method, with
        the continuation tokenized alone and appended after the harness's prompt (dyvte's teacher forcing). Request
        args: ``(context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)``."""
        results: list[tuple[float, bool]] = []
        with eval_mode(self.model, "lmms-eval dyvte"):
            for start in range(0, len(requests), self.batch_size):
                results.extend(self._loglikelihood([r.args for r in requests[start : start + self.batch_size]]))
        self._write_stats()
        return results

    @torch.no_grad()
    def _loglikelihood(self, args: list[tuple]) -> list[tuple[float, bool]]:
        records, targets = [], []
        tokenizer = self.processor.tokenizer
        for context, target, doc_to_visual, doc_id, task, split in args:
            records.append(self._record(context, doc_to_visual, task, split, doc_id))
            text = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
            ids = tokenizer(str(text), add_special_tokens=False)["input_ids"]
            if not ids:
                raise DataError(f"lmms-eval task {task!r}, doc {doc_id}: the continuation {text!r} has no tokens")
            targets.append(torch.tensor(ids))
        prompt = build_inputs(self.processor, records, dtype=self.model.dtype)
        host = teacher_force(self.processor, prompt, targets, dtype=self.model.dtype)
        host.pop("labels")
        with self.method.apply(self.model) as handle:
            logits = self.model(**to_device(host, self.device)).logits  # (B, T_out, V): the last T_out positions
            measured = _measured(handle)
        results = []
        for row, ids in enumerate(targets):  # the continuation is the row's last tokens (text: always kept)
            n = ids.numel()
            scores = logits[row, -n - 1 : -1].float().log_softmax(-1).cpu()  # (n, V): predictions of the n tokens
            logprob = float(scores.gather(-1, ids[:, None]).sum())
            results.append((logprob, bool((scores.argmax(-1) == ids).all())))
        self._record_stats("loglikelihood", args, host, measured)
        return results

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        """Not supported: multi-round tasks re-prompt with earlier answers, which dyvte's records carry as
        ``context`` only in its own harness."""
        raise NotImplementedError(
            "dyvte's lmms-eval model answers single-round tasks (generate_until, loglikelihood); multi-round tasks "
            "are not supported"
        )

    # ---------------------------------------------------------------------------------------- measurements

    def _record_stats(self, kind: str, args: list[tuple], host: dict[str, Any], measured: dict[str, Any]) -> None:
        """Per row, as the harness measures it: exit layer, prefill FLOPs relative to the full model (of the
        unpruned input), visual tokens and tokens the LLM received."""
        ids, mask = host["input_ids"], host["attention_mask"]
        visual = torch.isin(ids, self.spec.visual_ids).sum(1)
        tokens = mask.sum(1)
        exits = measured["exit_layers"]
        if exits is None:
            exits = torch.full((ids.shape[0],), self.spec.num_layers)
        fed_tokens = tokens if measured["fed_tokens"] is None else measured["fed_tokens"]
        fed_visual = visual if measured["fed_visual"] is None else measured["fed_visual"]
        config = self.model.config
        flops = prefill_flops(config, fed_tokens, fed_visual, exits, visual_after=measured["visual_after"]).flops
        relative = flops / prefill_flops(config, tokens, visual).full
        for row, a in enumerate(args):
            self.sample_stats.append(
                {
                    "task": a[4],
                    "split": a[5],
                    "doc_id": int(a[3]),
                    "request": kind,
                    "method": self.method.name,
                    "exit_layer": int(exits[row]),
                    "relative_flops": float(relative[row]),
                    "visual_tokens": int(fed_visual[row]),
                    "tokens": int(fed_tokens[row]),
                }
            )

    def task_means(self) -> dict[str, dict[str, float]]:
        """Per task: mean exit layer, relative prefill FLOPs, visual tokens and tokens fed, and the sample count."""
        by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in self.sample_stats:
            by_task[row["task"]].append(row)
        keys = ("exit_layer", "relative_flops", "visual_tokens", "tokens")
        return {
            task: {**{k: sum(r[k] for r in rows) / len(rows) for k in keys}, "samples": len(rows)}
            for task, rows in sorted(by_task.items())
        }

    def _write_stats(self) -> None:
        for task, means in self.task_means().items():
            logger.info(
                "dyvte %s on %s: mean exit layer %.3f, relative prefill FLOPs %.4f, visual tokens fed %.1f "
                "(%d samples)",
                self.method.name,
                task,
                means["exit_layer"],
                means["relative_flops"],
                means["visual_tokens"],
                means["samples"],
            )
        if self.stats_path is None:
            return
        lines = "".join(json.dumps(row) + "\n" for row in self.sample_stats)
        write_text_atomic(self.stats_path, lines)
        means = {"method": self.method.name, "spec": self.method_spec, "tasks": self.task_means()}
        write_text_atomic(means_path(self.stats_path), json.dumps(means, indent=1) + "\n")


def means_path(stats_path: str | Path) -> Path:
    """Where the per-task means of ``stats_path`` go: ``x.jsonl`` -> ``x.means.json``."""
    path = Path(stats_path)
    return path.with_name((path.stem if path.suffix == ".jsonl" else path.name) + ".means.json")


def _measured(handle: Any) -> dict[str, Any]:
    """What the method's handle says about the last call, copied to the host (``None`` where it says nothing)."""

    def host(value: Any) -> Any:
        return value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value

    names = ("exit_layers", "fed_tokens", "fed_visual", "visual_after")
    return {name: None if handle is None else host(getattr(handle, name, None)) for name in names}


def _cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first of the stop strings ``until`` (empty strings ignored)."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def _forms() -> str:
    return "; ".join(method_forms().values())
