#!/usr/bin/env bash
# The GPU benchmark, prepared to run unchanged on a machine with one CUDA GPU (nothing here has measured it yet).
#
#   benchmarks/gpu.sh OUT.md            # LLaVA-1.5-7B's decoder shape (32 x 4096, FFN 11008, 32 heads), bf16, SDPA,
#                                       # batch 4 x (35 text + 576 visual + 40 text tokens), 32 new tokens; the full
#                                       # model, static K = 8, per-row (mixed) exits and random exit heads, each with a
#                                       # static cache and with generate's torch.compile'd decoding forward: prefill s
#                                       # and decode ms/step, one Markdown table written to OUT.md
#   benchmarks/gpu.sh --smoke OUT.md    # the same Python command on the CPU at a tiny shape (seconds to a few minutes:
#                                       # the compiled mode compiles): checks the code path, no figure worth keeping
#
# Without CUDA (and without --smoke) it stops at once with a message. Weights are random (timing only); the exit heads
# are random too, so their row times what the heads cost, not a meaningful exit decision.
set -euo pipefail

usage() { echo "usage: $0 [--smoke] OUT.md" >&2; exit 2; }
smoke=0
if [[ "${1:-}" == "--smoke" ]]; then smoke=1; shift; fi
[[ $# -eq 1 && -n "$1" ]] || usage
out="$1"
python="${PYTHON:-python}"
cd "$(dirname "$0")/.."

if [[ $smoke -eq 1 ]]; then
    exec "$python" benchmarks/serving.py --device cpu --smoke --modes static compiled --output "$out"
fi

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "benchmarks/gpu.sh: CUDA is not available on this machine (torch.cuda.is_available() is False):" \
         "run it on a machine with a CUDA GPU, or pass --smoke to check the code path on the CPU" >&2
    exit 1
fi

exec "$python" benchmarks/serving.py --device cuda --dtype bf16 \
    --layers 32 --hidden 4096 --ffn 11008 --heads 32 --image-size 336 \
    --batch 4 --new-tokens 32 --modes static compiled --output "$out"
