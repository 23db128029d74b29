"""Withdrawal-aware LoRA adaptation of a frozen MLLM (default: the embedded demo model and digit-scenes data).

    python train/adapt.py --config configs/adapt_demo.yaml       # -> runs/adapt-demo/lora-vtw (adapter only)
    python train/adapt.py --config configs/adapt_demo.yaml --model.distill 0 --output_dir runs/lora-ce
    python train/evaluate.py --model demo --methods '[full, "static:all"]' --output_dir runs/eval-base
    python train/evaluate.py --model runs/adapt-demo/lora-vtw --methods '[full, "static:all"]' \
        --output_dir runs/eval-lora
    python train/adapt.py compare --base runs/eval-base --adapted runs/eval-lora    # side by side, earliest K
    python train/adapt.py --config configs/adapt_demo.yaml --output_dir checkpoints/demo-lora-vtw
                                                                  # regenerate the committed demo adapter

A configuration that can run no optimizer step (``--trainer.max_steps 0``, ``--trainer.max_epochs 0``,
``--trainer.limit_train_batches 0``) or an ``--output_dir`` / ``--merged_dir`` that is a file is refused before the
base model is loaded; a run that ends with no step writes no adapter.

Outputs go under ``<repo>/runs`` (ignored by git) unless ``--output_dir`` says otherwise: the adapter and
``training.json`` in ``runs/adapt-demo/lora-vtw``, Lightning's CSV logs in ``runs/adapt-demo/logs/version_N``;
both paths are logged. Only the adapter is written (``PeftModel.save_pretrained``; ``adapter_config.json`` names the
base, so ``dyvte.data.sources.load_model(<dir>)`` loads base + adapter). ``--merged_dir`` also writes the merged model
and
its processor as a plain ``from_pretrained`` directory (e.g. for ``train/fit.py --data.source.model <dir>``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from dyvte.demo import demo_checkpoint_dir  # noqa: E402
from dyvte.train.lora import AdaptData, AdaptModule, compare_sweeps  # noqa: E402
from dyvte.train.runs import (  # noqa: E402
    check_output_dir,
    check_training_budget,
    quiet_lightning,
    require_trained,
    runs_dir,
)
from dyvte.utils.io import write_text_atomic  # noqa: E402

log = logging.getLogger("adapt")

JOB_DIR = runs_dir("adapt-demo")  # the adapter in lora-vtw, Lightning logs in logs


class AdaptCLI(LightningCLI):
    """``LightningCLI`` with the adapter's output directory, an optional merged-model directory and CPU threads."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--output_dir",
            default=str(JOB_DIR / "lora-vtw"),
            help="where the adapter is written (PeftModel.save_pretrained; pass checkpoints/demo-lora-vtw to "
            "regenerate the committed demo adapter)",
        )
        parser.add_argument("--merged_dir", default=None, help="also write the merged model + processor here")
        parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")

    def before_instantiate_classes(self) -> None:
        """Refuse what cannot give a trained adapter or cannot be written, before the base model is loaded."""
        check_training_budget(self.config["trainer"], "LoRA adapter weights")
        check_output_dir("--output_dir", self.config["output_dir"])
        check_output_dir("--merged_dir", self.config["merged_dir"])
        if self.config["threads"] < 1:
            raise ValueError(f"--threads must be >= 1, got {self.config['threads']}")


def compare(base: str, adapted: str, tolerance: float = 0.005) -> None:
    """Print base vs adapted accuracy for every K from two ``train/evaluate.py`` output directories.

    Args:
        base: the base model's evaluate output directory (``full`` + ``static:all``).
        adapted: the adapted model's, on the same data.
        tolerance: accuracy drop allowed below the base model's full accuracy.
    """
    table, summary = compare_sweeps(base, adapted, tolerance)
    print(table)
    out = write_text_atomic(Path(adapted, "comparison.json"), json.dumps(summary, indent=2) + "\n")
    log.info("comparison written to %s", out)


def main(args: list[str] | None = None) -> None:
    """Train the adapter, save it (and optionally the merged model) and log where everything went.

    Args:
        args: command-line arguments (default: ``sys.argv[1:]``).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    quiet_lightning()
    cli = AdaptCLI(
        AdaptModule,
        AdaptData,
        run=False,
        args=args,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,  # an explicit seed: seed_everything(None) warns "No seed found" before seeding 0
        trainer_defaults={
            "accelerator": "cpu",
            "max_steps": 300,
            "val_check_interval": 100,
            "log_every_n_steps": 10,
            "num_sanity_val_steps": 0,
            "enable_checkpointing": False,
            "default_root_dir": str(JOB_DIR),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(JOB_DIR), "name": "logs"},
            },
        },
    )
    torch.set_num_threads(cli.config["threads"])
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    log_dir = Path(cli.trainer.log_dir).absolute()  # on every rank: under DDP it is a broadcast
    out = Path(cli.config["output_dir"]).absolute()
    require_trained(cli.trainer, "LoRA adapter weights", out)  # on every rank: global_step is the same everywhere
    if not cli.trainer.is_global_zero:
        return
    peft_model = cli.model.model
    peft_model.save_pretrained(out)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    base = demo_checkpoint_dir() if cli.model.hparams.model == "demo" else Path(cli.model.hparams.model)
    weights = sorted(base.glob("*.safetensors"))
    summary = {
        "base_weights_sha256": hashlib.sha256(b"".join(w.read_bytes() for w in weights)).hexdigest()[:16],
        "fit_seconds": seconds,
        "steps": cli.trainer.global_step,
        "trainable_parameters": trainable,
        "adapter_bytes": sum(f.stat().st_size for f in out.glob("adapter_model.*")),
        "hparams": {k: list(v) if isinstance(v, tuple) else v for k, v in cli.model.hparams.items() if k[0] != "_"},
        "threads": cli.config["threads"],
    }
    write_text_atomic(out / "training.json", json.dumps(summary, indent=2) + "\n")
    log.info("adapter and training.json written to %s (%s)", out, summary)
    log.info("Lightning logs (metrics.csv, config.yaml) in %s", log_dir)
    if cli.config["merged_dir"]:
        merged = peft_model.merge_and_unload().eval()
        merged.save_pretrained(cli.config["merged_dir"])
        cli.model.processor.save_pretrained(cli.config["merged_dir"])
        log.info("merged model written to %s", cli.config["merged_dir"])


if __name__ == "__main__":
    if sys.argv[1:2] == ["compare"]:
        from jsonargparse import CLI

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        CLI(compare, args=sys.argv[2:], as_positional=False)
    else:
        main()
