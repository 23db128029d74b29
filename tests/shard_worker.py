"""Test helper run as a separate process: label one rank's shards of a records file (tests/exits/test_shards.py).

    python -m tests.shard_worker MODEL RECORDS SHARDS --rank R --world W --shard_size S [--kill_at_shard K]

``--kill_at_shard K`` kills this process with SIGKILL when it starts labelling its K-th shard (0-based count of the
shards it labels), as a crash or a preempted job would: nothing after that point runs.
"""

from __future__ import annotations

import argparse
import os
import signal

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("records")
    parser.add_argument("shards")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--shard_size", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--kill_at_shard", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # every run uses the same threads, so floating-point sums happen in the same order

    import dyvte.exits.labels
    from dyvte.data.sources import load_model, load_records
    from dyvte.exits.shards import label_shards

    if args.kill_at_shard is not None:
        started = []
        build = dyvte.exits.labels.build_label_cache

        def build_or_die(*a, **k):
            if len(started) == args.kill_at_shard:
                os.kill(os.getpid(), signal.SIGKILL)
            started.append(1)
            return build(*a, **k)

        dyvte.exits.labels.build_label_cache = build_or_die
    model, processor = load_model(args.model)
    records = load_records(args.records, "train")
    from pathlib import Path

    label_shards(
        model,
        processor,
        records,
        Path(args.shards),
        shard_size=args.shard_size,
        rank=args.rank,
        world_size=args.world,
        batch_size=args.batch_size,
    )


if __name__ == "__main__":
    main()
