"""Exact-match accuracy of the demo MLLM per question type, with real images and with blank ones (text-only baseline).

    HF_HUB_OFFLINE=1 python train/eval_demo.py --split test

Greedy, left-padded batched ``generate``; prints a markdown table and writes no files.
"""

import argparse
import logging
import time

import torch

from dyvte.demo import QTYPES, load_demo_dataset, load_demo_model, load_demo_processor
from dyvte.demo.pretrain import evaluate_accuracy


def main() -> None:
    """Parses the arguments, evaluates, prints the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N records")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-baseline", action="store_true", help="skip the blank-image (text-only) baseline")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)

    model, processor = load_demo_model(), load_demo_processor()
    records = load_demo_dataset(args.split)
    if args.limit:
        records = records.select(range(min(args.limit, len(records))))
    rows = {}
    start = time.perf_counter()
    rows["full model"] = evaluate_accuracy(model, processor, records, args.batch_size)
    logging.info("full model evaluated in %.1f s", time.perf_counter() - start)
    if not args.no_baseline:
        rows["blank image (text only)"] = evaluate_accuracy(
            model, processor, records, args.batch_size, blank_images=True
        )

    counts = {q: sum(1 for t in records["qtype"] if t == q) for q in QTYPES}
    cols = [*QTYPES, "overall"]
    print(f"\n{args.split} split, {len(records)} records ({', '.join(f'{q} {n}' for q, n in counts.items())})\n")
    print("| run | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name, acc in rows.items():
        print(f"| {name} | " + " | ".join(f"{acc[c]:.3f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
