"""Trains the embedded demo MLLM from scratch; saves it to runs/pretrain-demo/mllm (+ dataset to .../data).

    python train/pretrain_demo.py --config configs/pretrain_demo.yaml
    python train/pretrain_demo.py --config configs/pretrain_demo.yaml \
        --output_dir checkpoints/demo-mllm --data_dir checkpoints/demo-data     # regenerate the committed demo

Any field can be overridden on the command line, e.g. ``--train.mllm.steps 100`` for a smoke run.
"""

import json
import logging

from jsonargparse import CLI

from dyvte.demo.pretrain import run_pretraining

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    result = CLI(run_pretraining, as_positional=False)
    print(json.dumps(result, indent=2))
