"""``dyvte fit``: train DyVTE exit heads on a frozen MLLM (default: the embedded demo model and digit-scenes data).

``python train/fit.py`` runs the same job with the same options; its docstring lists examples and every output
(heads and ``training.json`` under ``runs/fit-demo/exit-heads``, Lightning logs under ``runs/fit-demo/logs``, the
label cache under ``runs/label-cache``, all relative to the working directory). Needs the ``dyvte[train]`` extra.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402

from dyvte.cli.help import COMMON, HelpOption, format_help, help_request, option_lines  # noqa: E402
from dyvte.cli.shared import option_values, rewrite_aliases  # noqa: E402
from dyvte.exits.rules import LABEL_RULES  # noqa: E402
from dyvte.policies.exit_heads import CONFIG_NAME  # noqa: E402
from dyvte.train.certify import (  # noqa: E402
    certify,
    check_groups,
    check_promise,
    check_split_overlap,
)
from dyvte.train.checkpoints import EpochCheckpoint, fit_resumable  # noqa: E402
from dyvte.train.label_data import ExitLabelData  # noqa: E402
from dyvte.train.module import ExitHeadsModule, format_head_table, head_validation  # noqa: E402
from dyvte.train.options import DataSource, LabelOptions  # noqa: E402
from dyvte.train.progress import RunProgressBar  # noqa: E402
from dyvte.train.runs import (  # noqa: E402
    check_output_folder,
    check_training_budget,
    is_default,
    quiet_lightning,
    require_trained,
    run_name,
    runs_dir,
)
from dyvte.utils.devices import check_device  # noqa: E402
from dyvte.utils.io import staged_dir, write_text_atomic  # noqa: E402

log = logging.getLogger("fit")


def job_dir(model: str = "demo") -> Path:
    """``runs/fit-<model>`` under the working directory at the time of the call (``runs/fit-demo`` for the demo,
    ``runs/fit-llava-1.5-7b-hf`` for ``--data.source.model /models/llava-1.5-7b-hf``): heads in ``exit-heads``,
    Lightning logs in ``logs``."""
    return runs_dir(f"fit-{run_name(model)}")


class FitCLI(LightningCLI):
    """``LightningCLI`` with the heads' output directory and a resume checkpoint."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--output_dir",
            default=None,
            help="where the trained heads and training.json are written (default: runs/fit-<model>/exit-heads, "
            "the model's folder name; pass checkpoints/demo-exit-heads to regenerate the committed demo heads)",
        )
        parser.add_argument(
            "--ckpt_path",
            default=None,
            help="checkpoint to resume from, or last: the newest last.ckpt under the --trainer.logger folder",
        )
        parser.add_argument(
            "--tolerance",
            type=float,
            default=DEFAULT_TOLERANCE,
            help="the promise the saved thresholds keep: at most this share of answers differ from the full model's "
            "(e.g. 0.01 = 1%%), except with probability --delta; certified on the --data.splits.calib_samples records",
        )
        parser.add_argument("--delta", type=float, default=0.1, help="probability that the --tolerance promise fails")
        parser.add_argument(
            "--margin",
            type=float,
            default=DEFAULT_MARGIN,
            help="share of --tolerance kept in reserve, in [0, 1): the calibration records certify tolerance x "
            "(1 - margin), so a moderate shift between calibration and use still keeps --tolerance "
            f"(default {DEFAULT_MARGIN:g}, chosen on validation data: benchmarks/margin_shift.py)",
        )
        parser.add_argument(
            "--group_by",
            default="none",
            help="none (one pooled promise) or qtype: at most --tolerance differ in EACH question type, every type "
            "certified at --delta / G (Bonferroni over G types); every type needs its own calibration records, and "
            "a run where one has too few is refused before labelling (label caches keep only the qtype column)",
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="replace an --output_dir that holds an earlier run's heads, as a whole, when this run completes "
            "(without it such a folder is refused before any work; the default runs/fit-<model>/exit-heads is "
            "replaced with a warning)",
        )
        parser.add_argument(
            "--allow_overlap",
            type=bool,
            default=False,
            help="run even when more than 5%% of the validation or calibration records are copies of training "
            "records (or calibration of validation records); any copy is warned about",
        )

    def before_instantiate_classes(self) -> None:
        """Refuse what cannot give trained heads or cannot be written, before the model is loaded or labelled."""
        check_training_budget(self.config["trainer"], "exit heads")
        default = self._name_outputs()
        self.replacing = check_output_folder(
            "--output_dir",
            self.config["output_dir"],
            overwrite=self.config["overwrite"],
            default=default,
            marks=(CONFIG_NAME,),
            what="fit run's exit heads",
        )
        for option, value in (("--tolerance", self.config["tolerance"]), ("--delta", self.config["delta"])):
            if not 0.0 < value < 1.0:
                raise ValueError(f"{option} must be in (0, 1), got {value!r}")
        if not 0.0 <= self.config["margin"] < 1.0:
            raise ValueError(
                f"--margin must be in [0, 1) (0.25 certifies 75% of --tolerance), got {self.config['margin']!r}"
            )
        if self.config["group_by"] not in GROUP_BY:
            raise ValueError(
                f"--group_by must be one of {', '.join(GROUP_BY)}, got {self.config['group_by']!r} (the label caches "
                "keep only the qtype column of the records; grouping by another column is not supported yet)"
            )
        ckpt = self.config["ckpt_path"]
        if ckpt is not None and ckpt not in LIGHTNING_CKPT_NAMES and not Path(ckpt).is_file():
            raise ValueError(f"--ckpt_path {ckpt}: no such checkpoint file")

    def instantiate_trainer(self, **kwargs):
        """The trainer, with one progress bar over the whole training (:class:`RunProgressBar`) instead of
        Lightning's per-epoch bar, unless ``--trainer.enable_progress_bar false``."""
        trainer = self.config_init["trainer"]
        if trainer.get("enable_progress_bar") is not False:
            user = trainer.get("callbacks") or []
            trainer["callbacks"] = [*(user if isinstance(user, list) else [user]), RunProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def _name_outputs(self) -> bool:
        """Outputs named after the model: ``--output_dir`` and the Lightning logs go under ``runs/fit-<model>``
        unless given (the demo's ``runs/fit-demo`` is only the default of the demo). Returns whether
        ``--output_dir`` is that default folder (given or not)."""
        model = self.config["data"]["source"]["model"]
        jobs, placeholder = job_dir(model), str(job_dir())
        if self.config["output_dir"] is None:
            self.config["output_dir"] = str(jobs / "exit-heads")
        trainer = self.config["trainer"]
        if trainer.get("default_root_dir") == placeholder:
            trainer["default_root_dir"] = str(jobs)
        logger = trainer.get("logger")
        init = getattr(logger, "init_args", None)
        if init is not None and getattr(init, "save_dir", None) == placeholder:
            init.save_dir = str(jobs)
        return is_default(self.config["output_dir"], jobs / "exit-heads")


#: the default promise: at most 1% of answers differ from the full model's (fixed before any test figure was seen;
#: checkpoints/README.md: on the demo this keeps test accuracy within 0.5 pt)
DEFAULT_TOLERANCE = 0.01

#: the default ``--margin``: the share of the tolerance kept in reserve, chosen on validation records only by
#: benchmarks/margin_shift.py (the smallest margin that kept 1% in every seed when the thresholds were certified on
#: scenes of one half of the validation pool's digit images and used on the other half; docs/guide.md). The test
#: split was not read for it.
DEFAULT_MARGIN = 0.1

#: ``--group_by`` values: one pooled promise, or one per question type (the column label caches keep)
GROUP_BY = ("none", "qtype")

#: the default of ``--trainer.max_epochs``
MAX_EPOCHS = 40

#: ``ckpt_path`` values Lightning resolves itself
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")


#: fit's flat spellings of its nested data options (the common options of every command, docs/guide.md)
ALIASES = {
    "--image_folder": "--data.source.image_folder",
    "--skip_bad_rows": "--data.source.skip_bad_rows",
    "--prompt_template": "--data.source.prompt_template",
}

#: common options of the other commands that fit does not take, and what it takes instead
NOT_FIT_OPTIONS = {
    "--samples": "fit takes no --samples: it sizes its splits with --data.splits.train_samples, "
    "--data.splits.val_samples and --data.splits.calib_samples (validation and calibration records are held out at "
    "random, seeded by --data.splits.split_seed)",
    "--seed": "fit takes no --seed: --seed_everything seeds training, --data.splits.split_seed the held-out validation "
    "and calibration records",
    "--dtype": "fit takes no --dtype: it labels with the model in float32 and trains the heads in float32",
}

#: Lightning's accelerator names that mean the same device type
_ACCELERATORS = {"gpu": "cuda"}


def device_options(device: str) -> dict[str, str]:
    """The ``--trainer.*`` options that put fit on ``device`` (``cpu``, ``cuda`` or ``cuda:N``), checked against
    this machine.

    ``cpu`` -> ``--trainer.accelerator cpu``; ``cuda`` -> ``--trainer.accelerator cuda --trainer.devices 1``;
    ``cuda:N`` -> ``--trainer.accelerator cuda --trainer.devices [N]`` (one process on GPU N). Several GPUs:
    ``--trainer.devices`` and ``--trainer.strategy`` themselves.

    Raises:
        ValueError: a malformed device, or CUDA (or GPU N) that this machine does not have (the message names
            ``--device``).
    """
    dev = check_device(device, "--device")
    if dev.type == "cpu":
        return {"--trainer.accelerator": "cpu"}
    return {"--trainer.accelerator": "cuda", "--trainer.devices": "1" if dev.index is None else f"[{dev.index}]"}


def fit_arguments(args: Sequence[str]) -> list[str]:
    """``args`` with fit's flat spellings of the common options turned into its nested ones, before LightningCLI
    parses them: ``--image_folder``, ``--skip_bad_rows``, ``--prompt_template`` (:data:`ALIASES`) and ``--device``
    (:func:`device_options`). The nested spellings keep working.

    Raises:
        ValueError: one option given in both spellings with different values, a flat option without a value, a bad
            ``--device``, or ``--samples`` / ``--seed`` / ``--dtype``, which fit does not take (the message says
            what it takes instead).
    """
    args = list(args)
    found = option_values(args, [*NOT_FIT_OPTIONS, "--device", "--trainer.accelerator", "--trainer.devices"])
    for name, reason in NOT_FIT_OPTIONS.items():
        if name in found:
            raise ValueError(reason)
    args = rewrite_aliases(args, ALIASES, booleans=["--skip_bad_rows"])
    devices = found.get("--device", [])
    if not devices:
        return args
    if None in devices or len(set(devices)) > 1:
        raise ValueError(f"--device needs one value (cpu, cuda or cuda:N), got {devices}")
    wanted = device_options(devices[0])
    for option, value in wanted.items():
        given = {_ACCELERATORS.get(v, v) for v in found.get(option, []) if v is not None}
        if given - {value}:
            spelled = " ".join(f"{k} {v}" for k, v in wanted.items())
            raise ValueError(
                f"--device {devices[0]} is {spelled}, but {option} {', '.join(sorted(given))} is given too: give one"
            )
    out, i = [], 0
    while i < len(args):
        name, eq, _ = args[i].partition("=")
        if name == "--device":
            i += 1 if eq else 2
            out += [token for pair in wanted.items() for token in pair]
            continue
        out.append(args[i])
        i += 1
    return out


def short_help(prog: str) -> str:
    """``fit``'s short help: the common options it takes (flat spellings of its nested ones), its main options and
    examples; ``--help all`` is LightningCLI's full help."""
    source = DataSource()
    defaults = {"image_folder": source.image_folder, "skip_bad_rows": source.skip_bad_rows}
    defaults["prompt_template"] = source.prompt_template
    common = option_lines(["image_folder", "skip_bad_rows", "prompt_template"], defaults)
    device = "where labelling and training run: cpu, cuda or cuda:N (sets --trainer.accelerator, --trainer.devices)"
    common.append(HelpOption(f"--device {COMMON['device'][0]}", device))
    own = [
        HelpOption("--data.source.model DIR", f'"demo" or a local model directory (default: {source.model})'),
        HelpOption(
            "--data.source.data PATH",
            f'"demo", a save_to_disk folder or a .json/.jsonl/.parquet file (default: {source.data})',
        ),
        HelpOption(
            "--data.splits.train_samples N",
            "records to label for training (default: all; the demo: its measured sizes); also "
            "--data.splits.val_samples, --data.splits.calib_samples (default: from the records given)",
        ),
        HelpOption(
            "--data.labels.rule RULE",
            f"what the heads learn: {', '.join(LABEL_RULES)} (default: {LabelOptions().rule})",
        ),
        HelpOption(
            "--data.labels.visual_inputs",
            "true: the heads also read the visual tokens' pooled states at their layer (default: false)",
        ),
        HelpOption("--output_dir DIR", "where the heads and training.json go (default: runs/fit-<model>/exit-heads)"),
        HelpOption("--overwrite true", "replace an --output_dir that holds earlier heads (refused without)"),
        HelpOption(
            "--tolerance EPS",
            f"at most this share of answers differ from the full model's (default: {DEFAULT_TOLERANCE})",
        ),
        HelpOption(
            "--trainer.max_epochs N",
            f"training epochs (default: {MAX_EPOCHS}); every --trainer.* option is Lightning's",
        ),
        HelpOption("--ckpt_path FILE|last", "resume: a checkpoint, or last (the newest last.ckpt of the run's logs)"),
        HelpOption("--config FILE", "options from a YAML file (configs/fit_demo.yaml)"),
    ]
    return format_help(
        prog,
        "Train DyVTE exit heads on a frozen MLLM (default: the embedded demo model and data) and certify their "
        "thresholds.",
        [
            ("common options (the same on every dyvte command; on fit, short for --data.source.*)", common),
            ("fit options", own),
        ],
        [
            f"{prog}                                   # demo -> runs/fit-demo/exit-heads",
            f"{prog} --data.source.data llava.json --image_folder images/ --skip_bad_rows true --device cuda",
        ],
        notes=[
            "Not fit options: --samples, --seed (--data.splits.* size and seed the splits), --dtype (labels in "
            "float32)."
        ],
    )


def main(args: list[str] | None = None, prog: str | None = None) -> dict:
    """Label (or reuse the label cache), train the heads, save them and log the per-head validation table.

    ``-h`` / ``--help`` prints the short help (:func:`short_help`), ``--help all`` every option.

    Args:
        args: command-line arguments (default: ``sys.argv[1:]``).
        prog: the program name in usage and help messages (default: the script's file name).

    Returns:
        The ``training.json`` summary on global rank 0, ``{}`` on the other ranks.
    """
    mode, args = help_request(sys.argv[1:] if args is None else args)
    if mode == "short":
        print(short_help(prog or Path(sys.argv[0]).name))
        raise SystemExit(0)
    given = list(args)  # as typed: the resume command logged on Ctrl-C / SIGTERM repeats them
    if mode is None:
        args = fit_arguments(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    quiet_lightning()
    datasets.disable_progress_bars()  # the label caches' "Saving the dataset" bars: the labelling bar says it all
    jobs = job_dir()
    with warnings.catch_warnings():
        # the arguments are sys.argv[1:] (or the dyvte command's), rewritten: not other arguments than the command's
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = FitCLI(
            ExitHeadsModule,
            ExitLabelData,
            run=False,
            args=args,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": prog} if prog else None,
            seed_everything_default=0,  # an explicit seed: seed_everything(None) warns "No seed found" before seeding 0
            trainer_defaults={
                "accelerator": "cpu",
                "max_epochs": MAX_EPOCHS,
                "log_every_n_steps": 5,
                "default_root_dir": str(jobs),
                "logger": {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": str(jobs), "name": "logs"},
                },
                "callbacks": [EpochCheckpoint(prog or f"python {sys.argv[0]}", given)],
            },
        )
    data: ExitLabelData = cli.datamodule
    check_promise(data, cli.config["tolerance"], cli.config["delta"])
    check_groups(data, cli.config["group_by"], cli.config["tolerance"], cli.config["delta"], cli.config["margin"])
    check_split_overlap(data, cli.config["allow_overlap"])
    out = Path(cli.config["output_dir"]).absolute()  # logged and recorded absolute: YAML paths are relative to cwd
    if rank_zero_only.rank == 0 and cli.replacing:
        log.log(logging.INFO if cli.config["overwrite"] else logging.WARNING, "%s", cli.replacing)
    if rank_zero_only.rank == 0:
        logger = cli.trainer.logger
        log.info(
            "heads will be written to %s, Lightning logs under %s, label cache in %s",
            out,
            Path(getattr(logger, "root_dir", None) or cli.trainer.default_root_dir).absolute(),
            data.cache_root,
        )
    start = time.perf_counter()
    fit_resumable(cli.trainer, cli.model, data, cli.config["ckpt_path"])  # "last": the newest last.ckpt, or an error
    seconds = time.perf_counter() - start
    log_dir = str(Path(cli.trainer.log_dir).absolute())  # on every rank: under DDP it is a broadcast
    require_trained(cli.trainer, "exit heads", out)  # on every rank: global_step is the same everywhere
    if not cli.trainer.is_global_zero:
        return {}
    heads = cli.model.heads
    heads.config.label_rule = data.labels.rule
    calibration = certify(
        heads, data, cli.config["tolerance"], cli.config["delta"], cli.config["margin"], cli.config["group_by"]
    )
    features, targets = data.tensors["val"]
    per_head = head_validation(heads, features, targets)
    caches = data.cache_paths()
    meta = data.meta or {}
    summary = {
        "fit_seconds": seconds,
        "labels_ms_per_sample": meta.get("ms_per_sample"),
        "epochs": cli.trainer.current_epoch,
        "steps": cli.trainer.global_step,
        "label_rule": data.labels.rule,
        "threshold": heads.config.threshold,
        "thresholds": heads.config.thresholds,
        "calibration": None if calibration is None else {k: v for k, v in calibration.items() if k != "record_digests"},
        "promise": calibration["promise"] if calibration else "none: no calibration, the heads keep one threshold",
        "val_samples": len(targets),
        "validation_split": data.split_summary(),
        "val_heads": per_head,
        "logs": log_dir,
        "label_cache": {name: str(path) for name, path in caches.items()},
    }
    with staged_dir(out) as folder:  # the whole folder or nothing: no file of an earlier run survives beside these
        heads.save_pretrained(folder)
        write_text_atomic(folder / "training.json", json.dumps(summary, indent=2) + "\n")
    log.info(
        "validation of each head's exit decision at threshold %s (%d samples, label rule %r; precision: of the "
        "samples it exits, the share labelled safe; recall: of the samples labelled safe, the share it exits):\n%s",
        "calibrated per head" if heads.config.thresholds else heads.config.threshold,
        len(targets),
        data.labels.rule,
        format_head_table(per_head),
    )
    log.info("heads and training.json written to %s (%.1f s, %d steps)", out, seconds, cli.trainer.global_step)
    log.info("Lightning logs (metrics.csv, config.yaml, checkpoints/last.ckpt) in %s", log_dir)
    names = {"train": "train", "val": "validation", "calib": "calibration"}
    log.info("label cache: %s", ", ".join(f"{path} ({names[name]})" for name, path in caches.items()))
    return summary
