"""Write a range of the demo's deterministic record stream as a records folder for ``train/fit.py``.

Heads that learn from handwriting the demo model never trained on take validation records 15000..38999 (validation
records 0..14999 Platt-scale and calibrate them; docs/guide.md, "Heads that learn from handwriting the model never
saw"):

    python train/demo_records.py --split validation --start 15000 --stop 39000

writes runs/demo-records/validation-15000-39000 (``--output`` elsewhere).
Prints where the folder went.
"""

import argparse
import logging

from dyvte.demo.data import SPLITS, export_records


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments and write the folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=SPLITS, default="validation")
    parser.add_argument("--start", type=int, default=15000)
    parser.add_argument("--stop", type=int, default=39000)
    parser.add_argument("--output", default=None, help="default: runs/demo-records/<split>-<start>-<stop>")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    output = args.output or f"runs/demo-records/{args.split}-{args.start}-{args.stop}"
    try:
        path = export_records(args.split, args.start, args.stop, output, overwrite=args.overwrite, progress=True)
    except ValueError as err:
        parser.error(str(err))
    logging.getLogger("demo_records").info("records folder: %s", path.resolve())


if __name__ == "__main__":
    main()
