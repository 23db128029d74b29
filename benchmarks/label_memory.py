"""Peak memory and speed of streaming, sharded labelling: N demo samples exported to LLaVA instruction JSON.

For each N the demo records (train + validation + test, 11,000, cycled beyond that with distinct ids) are written as
``llava_format.json`` + ``images/`` under ``--workdir`` (not measured); a fresh child process then converts the JSON
(streamed into Arrow), labels every shard with the demo model and merges the shards, the way ``train/fit.py
--data.source.data llava_format.json`` does. The child reports its peak RSS after labelling (``VmHWM``, which includes
the memory-mapped records and shard files it touched) and after the merge, the peak anonymous memory (``RssAnon``
sampled every 50 ms: memory that is the process's own, not file pages the kernel can drop), and the labelling time per
sample.

    python benchmarks/label_memory.py --samples 1000 20000 --threads 1 --output runs/label-memory.json
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

logger = logging.getLogger("label_memory")
ROOT = Path(__file__).resolve().parents[1]


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in kB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def export(samples: int, workdir: Path) -> Path:
    """Write ``samples`` demo records as LLaVA instruction JSON under ``workdir`` (skipped when already there)."""
    import datasets

    from dyvte.data.formats import export_llava
    from dyvte.demo import load_demo_dataset

    path = workdir / f"llava-{samples}.json"
    if path.is_file():
        return path
    demo = load_demo_dataset()
    records = datasets.concatenate_datasets([demo[s].select_columns(["image", "question", "answer"]) for s in demo])
    return export_llava(records, workdir, samples, name=path.name)


def child(path: Path, cache: Path, shard_size: int, batch_size: int, threads: int) -> dict:
    """Convert, label and merge in this process; returns the measurements."""
    import torch

    torch.set_num_threads(threads)
    from dyvte.data.sources import load_model, load_records
    from dyvte.exits.shards import label_shards, merge_shards

    peak_anon = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak_anon[0] = max(peak_anon[0], _status("RssAnon"))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    model, processor = load_model("demo")
    start = time.perf_counter()
    records = load_records(str(path), "train", image_folder=str(path.parent))
    convert = time.perf_counter() - start
    rss_loaded = _status("VmHWM")
    start = time.perf_counter()
    label_shards(
        model, processor, records, cache.with_name(cache.name + ".shards"), shard_size=shard_size, batch_size=batch_size
    )
    seconds = time.perf_counter() - start
    rss_labelled, anon_labelled = _status("VmHWM"), peak_anon[0]
    merge_shards(cache.with_name(cache.name + ".shards"), cache, len(records), shard_size)
    stop.set()
    sampler.join()
    return {
        "samples": len(records),
        "convert_s": convert,
        "label_s": seconds,
        "ms_per_sample": 1e3 * seconds / len(records),
        "peak_rss_mb_model_loaded": rss_loaded / 1024,
        "peak_rss_mb_labelling": rss_labelled / 1024,
        "peak_anon_mb_labelling": anon_labelled / 1024,
        "peak_rss_mb_with_merge": _status("VmHWM") / 1024,
        "peak_anon_mb_with_merge": peak_anon[0] / 1024,
        "threads": threads,
        "shard_size": shard_size,
        "batch_size": batch_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[1000, 20000])
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "label-memory"))
    parser.add_argument("--shard_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    workdir = Path(args.workdir)
    if args.child:
        cache = workdir / f"cache-{Path(args.child).stem}"
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(cache.with_name(cache.name + ".shards"), ignore_errors=True)
        result = child(Path(args.child), cache, args.shard_size, args.batch_size, args.threads)
        print("RESULT " + json.dumps(result), flush=True)  # noqa: T201 (read by the parent process)
        return
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for n in args.samples:
        path = export(n, workdir)
        command = [sys.executable, __file__, "--child", str(path), "--workdir", str(workdir)]
        command += [f"--shard_size={args.shard_size}", f"--batch_size={args.batch_size}", f"--threads={args.threads}"]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
        results.append(json.loads(line.removeprefix("RESULT ")))
        logger.info("%d samples: %s", n, results[-1])
    if len(results) > 1:
        first, last = results[0], results[-1]
        for key in ("peak_rss_mb_labelling", "peak_anon_mb_labelling", "peak_rss_mb_with_merge"):
            logger.info("%s: %.1f -> %.1f MB (%+.1f%%)", key, first[key], last[key], 100 * (last[key] / first[key] - 1))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
