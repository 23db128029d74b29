"""What labelling costs: FLOPs per labelled sample (``dyvte.exits.labels.label_batch``), and hours per million samples.

Per sample, ``label_batch`` runs: one greedy ``generate`` (prefill of the prompt + up to ``max_new_tokens`` decode
steps), one teacher-forced full forward and L withdrawn forwards (K = 0..L-1) of the prompt plus the forced answer,
with logits at every kept position; a sample whose greedy answer differs from its gold answer adds a second row
(gold-forced) to those L + 1 forwards. FLOPs come from ``dyvte.prefill_flops`` (detailed convention: decoder and
LM head; the vision tower, under 1% at LLaVA-1.5-7B, is not counted).

Given a measured labelling time per sample (``--measured_ms``, e.g. from ``benchmarks/label_memory.py``) on the demo
shape, it prints the achieved FLOP rate; for a target shape it prints FLOPs per sample and hours per million samples
on ``--gpus`` devices at each ``--tflops`` (sustained FLOP/s per device: an input, not a measurement).

    python benchmarks/label_cost.py --measured_ms 59 --gpus 8 --tflops 100 200 400
"""

from __future__ import annotations

import argparse
import logging
from types import SimpleNamespace

from dyvte.eval.flops import prefill_flops

logger = logging.getLogger("label_cost")


def text_config(layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int) -> SimpleNamespace:
    """A Llama-like text config with just what ``prefill_flops`` reads."""
    return SimpleNamespace(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        vocab_size=vocab,
    )


def flops_per_sample(cfg, prompt: int, visual: int, greedy: int, gold: int, differ: float) -> float:
    """FLOPs of labelling one sample (``differ``: share of samples whose greedy answer is not the gold one)."""
    layers = cfg.num_hidden_layers
    generate = prefill_flops(cfg, prompt, visual).flops  # prefill, LM head on the last token
    generate += prefill_flops(cfg, prompt + greedy, visual).flops - generate  # the decode steps, roughly
    total = generate
    for tokens, weight in ((prompt + greedy, 1.0), (prompt + gold, differ)):
        full = prefill_flops(cfg, tokens, visual, lm_head_tokens=tokens).flops
        withdrawn = sum(
            prefill_flops(cfg, tokens, visual, k, lm_head_tokens=tokens - visual).flops for k in range(layers)
        )
        total += weight * (full + withdrawn)
    return float(total)


def on_the_fly_flops(cfg, prompt: int, visual: int, gold: int) -> float:
    """FLOPs of one on-the-fly step per sample (``dyvte.exits.onthefly``): a full and a withdrawn copy of the
    gold-forced
    prompt, the exit layer uniform in ``[1, L-1]``."""
    layers, tokens = cfg.num_hidden_layers, prompt + gold
    full = prefill_flops(cfg, tokens, visual, lm_head_tokens=tokens).flops
    withdrawn = [prefill_flops(cfg, tokens, visual, k, lm_head_tokens=tokens - visual).flops for k in range(1, layers)]
    return float(full + sum(withdrawn) / len(withdrawn))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measured_ms", type=float, default=None, help="measured demo labelling ms per sample")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--tflops", type=float, nargs="+", default=[100.0, 200.0, 400.0])
    parser.add_argument("--text_tokens", type=int, default=60, help="target prompt text tokens (assumed)")
    parser.add_argument("--answer_tokens", type=int, default=40, help="target gold answer tokens (assumed)")
    parser.add_argument("--differ", type=float, default=1.0, help="share of greedy answers that differ from gold")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from dyvte.demo import load_demo_model

    # the demo's own config; its prompts are 44-48 tokens (36 visual), its answers 1 word + the end token, and its
    # greedy answer differs from the gold one on 7.3% of the test split
    demo_flops = flops_per_sample(load_demo_model().config.text_config, 46, 36, 2, 2, 0.073)
    logger.info("demo: %.3g FLOPs per labelled sample", demo_flops)
    if args.measured_ms:
        logger.info(
            "demo measured %.1f ms/sample -> %.2f GFLOP/s achieved",
            args.measured_ms,
            demo_flops / args.measured_ms / 1e6,
        )
    llava = text_config(32, 4096, 11008, 32, 32, 32064)
    prompt = 576 + args.text_tokens
    flops = flops_per_sample(llava, prompt, 576, 8, args.answer_tokens, args.differ)
    logger.info(
        "LLaVA-1.5-7B (576 visual + %d text tokens, %d-token gold answers, %.0f%% differ): %.3g TFLOPs per sample",
        args.text_tokens,
        args.answer_tokens,
        100 * args.differ,
        flops / 1e12,
    )
    fly = on_the_fly_flops(llava, prompt, 576, args.answer_tokens)
    logger.info(
        "LLaVA-1.5-7B on-the-fly labels (one exit layer per sample and step): %.3g TFLOPs per sample", fly / 1e12
    )
    logger.info(
        "| sustained TFLOP/s per GPU | hours per million samples on %d GPUs: label cache (every K) "
        "| on the fly, per epoch |",
        args.gpus,
    )
    logger.info("|---:|---:|---:|")
    for tflops in args.tflops:
        rate = args.gpus * tflops * 1e12 * 3600
        logger.info("| %g | %.1f | %.1f |", tflops, flops * 1e6 / rate, fly * 1e6 / rate)


if __name__ == "__main__":
    main()
