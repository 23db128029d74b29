"""Train DyVTE exit heads on a frozen MLLM (default: the embedded demo model and digit-scenes data).

    python train/fit.py                                   # demo model + data -> checkpoints/demo-exit-heads
    python train/fit.py --config configs/fit_demo.yaml    # the same, from YAML
    python train/fit.py --trainer.strategy ddp --trainer.devices 2    # two processes on CPU
    python train/fit.py --ckpt_path runs/exit-heads/version_0/checkpoints/last.ckpt   # resume

Labels and head inputs are cached once per (model, data) under .cache/labels; training then never runs the MLLM.
Lightning checkpoints hold only the heads; the final heads are written with ExitHeads.save_pretrained.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from dyvte.training import REPO_ROOT, ExitHeadsModule, ExitLabelData  # noqa: E402


class FitCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--output_dir",
            default=str(REPO_ROOT / "checkpoints" / "demo-exit-heads"),
            help="where the trained heads are written (save_pretrained)",
        )
        parser.add_argument("--ckpt_path", default=None, help="Lightning checkpoint to resume from")


def main(args: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cli = FitCLI(
        ExitHeadsModule,
        ExitLabelData,
        run=False,
        args=args,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "accelerator": "cpu",
            "max_epochs": 40,
            "log_every_n_steps": 5,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(REPO_ROOT / "runs"), "name": "exit-heads"},
            },
            "callbacks": [ModelCheckpoint(save_last=True, save_top_k=0)],
        },
    )
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config["ckpt_path"])
    seconds = time.perf_counter() - start
    if cli.trainer.is_global_zero:
        out = Path(cli.config["output_dir"])
        cli.model.heads.save_pretrained(out)
        meta = cli.datamodule.meta or {}
        summary = {
            "fit_seconds": seconds,
            "labels_ms_per_sample": meta.get("ms_per_sample"),
            "epochs": cli.trainer.current_epoch,
            "steps": cli.trainer.global_step,
            "label_rule": cli.datamodule.hparams.label_rule,
        }
        (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
        logging.getLogger("fit").info("heads written to %s (%s)", out, summary)


if __name__ == "__main__":
    main()
