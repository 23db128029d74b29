"""What labelling costs: FLOPs per labelled sample (``dyvte.exits.labels.label_batch``), and hours per million samples.

Per sample, ``label_batch`` runs one teacher-forced full forward and L withdrawn forwards (K = 0..L-1) of the prompt
plus its gold answer; a sample whose greedy answer is not the gold one (the full model's argmax differs from a gold
token) is also decoded with ``generate`` (prefill of the prompt + up to ``max_new_tokens`` decode steps) and forced
again, with its greedy answer, through those L + 1 forwards. By branching (the default,
:mod:`dyvte.exits.branching`) the withdrawn forward at K runs only layers K..L-1, on the text tokens; both counts are
printed. FLOPs come from ``dyvte.prefill_flops``
(detailed convention: decoder and LM head; the vision tower, under 1% at LLaVA-1.5-7B, is not counted).

Given a measured labelling time per sample (``--measured_ms``, e.g. from ``benchmarks/label_memory.py``) on the demo
shape, it prints the achieved FLOP rate; for a target shape it prints FLOPs per sample and hours per million samples
on ``--gpus`` devices at each ``--tflops`` (sustained FLOP/s per device: an input, not a measurement).

    python benchmarks/label_cost.py --measured_ms 59 --gpus 8 --tflops 100 200 400

``--measure`` times ``label_batch`` itself, the old way (``branch=False``: the whole withdrawn model once per K) and by
branching (``branch=True``: layers 0..K-1 and the vision encoder replayed from the full forward,
:mod:`dyvte.exits.branching`), on the demo model and on a random LLaVA-1.5-shaped model (32 layers, 576 visual
tokens per image, the 32064-token vocabulary; ``--llava_hidden`` / ``--llava_ffn`` narrow the decoder to fit a CPU).
Each run's cost is given in full-forward equivalents: its time over the time of the teacher-forced full forward of the
same batch inside it (the call with ``output_hidden_states``), with its parts (greedy ``generate``, full forward,
the L withdrawn forwards), and in samples/s; a markdown table is printed at the end.

    python benchmarks/label_cost.py --measure --llava_hidden 512 --llava_ffn 1376 --llava_samples 2
"""

from __future__ import annotations

import argparse
import logging
import time
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

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


def flops_per_sample(
    cfg, prompt: int, visual: int, greedy: int, gold: int, differ: float, branch: bool = False
) -> float:
    """FLOPs of labelling one sample: every sample's gold answer is forced through the full model and withdrawal at
    every K; a sample whose greedy answer is not the gold one (share ``differ``) is also decoded (``generate``) and
    forced again with its greedy answer. ``branch``: the withdrawn forward at K runs only layers K..L-1, layers
    0..K-1 being replayed from the full one."""
    layers = cfg.num_hidden_layers
    generate = prefill_flops(cfg, prompt + greedy, visual).flops  # the prompt's prefill and decode steps, roughly
    total = differ * generate
    for tokens, weight in ((prompt + gold, 1.0), (prompt + greedy, differ)):
        full = prefill_flops(cfg, tokens, visual, lm_head_tokens=tokens).flops
        layer = prefill_flops(cfg, tokens, visual, lm_head_tokens=0).flops / layers  # one layer, every token
        withdrawn = sum(
            prefill_flops(cfg, tokens, visual, k, lm_head_tokens=tokens - visual).flops - branch * k * layer
            for k in range(layers)
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


class CallClock:
    """Wall time of every top-level call of a model, by kind: ``full`` (the call with ``output_hidden_states``),
    ``withdrawn`` (under an active withdrawal) and ``generate`` (the rest: generate's prefill and decode steps)."""

    def __init__(self, model) -> None:
        self.seconds: dict[str, list[float]] = {"generate": [], "full": [], "withdrawn": []}
        self._start = 0.0
        self._kind = "generate"
        self._device = next(model.parameters()).device
        self._hooks = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True),
            model.register_forward_hook(self._post, always_call=True),
        ]

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def _pre(self, module, args, kwargs) -> None:
        from dyvte.engine.withdrawal import active_withdrawal

        if active_withdrawal(module) is not None:
            self._kind = "withdrawn"
        else:
            self._kind = "full" if kwargs.get("output_hidden_states") else "generate"
        self._sync()
        self._start = time.perf_counter()

    def _post(self, module, args, output) -> None:
        self._sync()
        self.seconds[self._kind].append(time.perf_counter() - self._start)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def time_labelling(
    model, processor, records: list[dict], branch: bool, max_new_tokens: int, warmup: bool = True
) -> dict[str, float]:
    """One ``label_batch`` call (after a warm-up call on the first record, if ``warmup``): its seconds, and per kind
    of call."""
    from dyvte.data.records import build_inputs
    from dyvte.exits.labels import label_batch

    with torch.no_grad():
        if warmup:
            label_batch(model, processor, records[:1], max_new_tokens=max_new_tokens, branch=branch)
        else:  # one forward: the first call of a fresh model pays one-off costs
            inputs = build_inputs(processor, records[:1], with_answers=True, dtype=model.dtype)
            model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
        clock = CallClock(model)
        try:
            start = time.perf_counter()
            label_batch(model, processor, records, max_new_tokens=max_new_tokens, branch=branch)
            total = time.perf_counter() - start
        finally:
            clock.remove()
    parts = {kind: sum(times) for kind, times in clock.seconds.items()}
    layers = len(clock.seconds["withdrawn"]) // len(clock.seconds["full"])
    # the second pass (rows whose greedy answer is not the gold one): generate, its full and withdrawn forwards
    second = parts["generate"] + sum(clock.seconds["full"][1:]) + sum(clock.seconds["withdrawn"][layers:])
    return {"total": total, **parts, "full_once": clock.seconds["full"][0], "second_pass": second}


def random_llava_processor(shape):
    """A ``LlavaProcessor`` for :func:`dyvte.eval.benchmark.build_random_llava`: a word-level tokenizer (words
    ``w4``.. plus ``USER:``/``ASSISTANT:``; ``<image>`` is the model's image token id) and a 336-pixel CLIP image
    processor, 576 placeholders per image."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.clip import CLIPImageProcessorPil

    from dyvte.data.prompts import attach_prompt_template
    from dyvte.eval.benchmark import IMAGE_TOKEN_ID

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "USER:": 4, "ASSISTANT:": 5}
    vocab.update({f"w{i}": i for i in range(6, 1000)})
    vocab["<image>"] = IMAGE_TOKEN_ID
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    size = {"height": shape.image_size, "width": shape.image_size}
    images = CLIPImageProcessorPil(size=size, crop_size=size, do_center_crop=False)
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=shape.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return attach_prompt_template(processor, "USER: <image> {question} ASSISTANT:")


def random_records(count: int, size: int, question_words: int, answer_words: int, seed: int = 0) -> list[dict]:
    """``count`` records of random pixels and random words of :func:`random_llava_processor`'s vocabulary."""
    rng = np.random.default_rng(seed)

    def words(n: int) -> str:
        return " ".join(f"w{i}" for i in rng.integers(6, 1000, size=n))

    return [
        {
            "image": Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)),
            "question": words(question_words),
            "answer": words(answer_words),
        }
        for _ in range(count)
    ]


def measure(args: argparse.Namespace) -> list[str]:
    """Time both labelling paths on the demo and the random LLaVA shape; returns the markdown table rows."""
    from dyvte.demo import load_demo_dataset, load_demo_model, load_demo_processor
    from dyvte.eval.benchmark import LlavaShape, build_random_llava

    demo = load_demo_model()
    demo_records = list(load_demo_dataset("test").select(range(args.demo_samples)))
    shape = LlavaShape(
        hidden_size=args.llava_hidden,
        num_layers=32,
        intermediate_size=args.llava_ffn,
        num_heads=args.llava_hidden // 128,
        num_kv_heads=args.llava_hidden // 128,
    )
    llava = build_random_llava(shape, dtype=torch.float32)
    llava.generation_config.suppress_tokens = [llava.config.image_token_index]  # a random model may emit it
    cases = [  # the small demo model is warmed up first (its first calls pay one-off costs); the LLaVA shape not
        ("demo (8 x 128, 36 visual tokens)", demo, load_demo_processor(), demo_records),
        (
            f"LLaVA-1.5 shape, 32 x {shape.hidden_size} (FFN {shape.intermediate_size}), 576 visual tokens",
            llava,
            random_llava_processor(shape),
            random_records(args.llava_samples, shape.image_size, args.text_tokens, args.answer_tokens),
        ),
    ]
    rows = []
    for name, model, processor, records in cases:
        for branch in [path == "branching" for path in args.paths.split(",")]:
            t = time_labelling(model, processor, records, branch, args.max_new_tokens, warmup=model is demo)
            full = t["full_once"]
            decoded = _decoded_share(model, processor, records, args.max_new_tokens)
            if decoded > 0:  # the second pass scaled to the projected share of decoded rows
                second = args.project_differ * t["second_pass"] / decoded
                projected = f"{(t['total'] - t['second_pass'] + second) / full:.2f}"
            else:
                projected = "—"  # no row was decoded: nothing to scale
            rows.append(
                f"| {name} | {len(records)} | {'branching' if branch else 'whole forward per K'} "
                f"| {len(records) / t['total']:.3g} | {t['total'] / full:.2f} ({decoded:.0%} decoded) "
                f"| {projected} | {t['generate'] / full:.2f} "
                f"| {t['full'] / full:.2f} | {t['withdrawn'] / full:.2f} | {1e3 * full:.0f} |"
            )
            logger.info(rows[-1])
    return rows


def _decoded_share(model, processor, records: list[dict], max_new_tokens: int) -> float:
    """The share of ``records`` that ``label_batch`` decodes (its greedy answer is not the gold one): one minus the
    full model's correct column."""
    from dyvte.exits.labels import label_batch

    with torch.no_grad():
        correct = label_batch(model, processor, records, max_new_tokens=max_new_tokens)["correct"][:, -1]
    return float(1 - correct.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measured_ms", type=float, default=None, help="measured demo labelling ms per sample")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--tflops", type=float, nargs="+", default=[100.0, 200.0, 400.0])
    parser.add_argument("--text_tokens", type=int, default=60, help="target prompt text tokens (assumed)")
    parser.add_argument("--answer_tokens", type=int, default=40, help="target gold answer tokens (assumed)")
    parser.add_argument("--differ", type=float, default=1.0, help="share of greedy answers that differ from gold")
    parser.add_argument("--measure", action="store_true", help="time label_batch, old path and branching")
    parser.add_argument("--demo_samples", type=int, default=16, help="demo records in the measured batch")
    parser.add_argument("--llava_samples", type=int, default=2, help="random-LLaVA records in the measured batch")
    parser.add_argument("--llava_hidden", type=int, default=4096, help="random LLaVA decoder width (7B: 4096)")
    parser.add_argument("--llava_ffn", type=int, default=11008, help="random LLaVA FFN width (7B: 11008)")
    parser.add_argument("--max_new_tokens", type=int, default=8, help="greedy answer length bound")
    parser.add_argument("--paths", default="old,branching", help="measured paths: old (whole forward per K), branching")
    parser.add_argument(
        "--project_differ",
        type=float,
        default=0.3,
        help="the share of decoded rows (greedy answer not the gold one) the projected column assumes",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.measure:
        torch.manual_seed(0)
        rows = measure(args)
        logger.info(
            "| model | samples | path | samples/s | full-forward equivalents (share decoded) | the same if %.0f%% were "
            "decoded | of which generate | full forwards | withdrawn forwards | one full forward (ms) |",
            100 * args.project_differ,
        )
        logger.info("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        for row in rows:
            logger.info(row)
        return
    from dyvte.demo import load_demo_model

    # the demo's own config; its prompts are 44-48 tokens (36 visual), its answers 1 word + the end token, and its
    # greedy answer differs from the gold one on 7.3% of the test split
    demo_config = load_demo_model().config.text_config
    demo_flops = flops_per_sample(demo_config, 46, 36, 2, 2, 0.073)
    logger.info(
        "demo: %.3g FLOPs per labelled sample, %.3g by branching",
        demo_flops,
        flops_per_sample(demo_config, 46, 36, 2, 2, 0.073, branch=True),
    )
    if args.measured_ms:
        logger.info(
            "demo measured %.1f ms/sample -> %.2f GFLOP/s achieved",
            args.measured_ms,
            demo_flops / args.measured_ms / 1e6,
        )
    llava = text_config(32, 4096, 11008, 32, 32, 32064)
    prompt = 576 + args.text_tokens
    flops = flops_per_sample(llava, prompt, 576, 8, args.answer_tokens, args.differ)
    branched = flops_per_sample(llava, prompt, 576, 8, args.answer_tokens, args.differ, branch=True)
    logger.info(
        "LLaVA-1.5-7B (576 visual + %d text tokens, %d-token gold answers, %.0f%% differ): %.3g TFLOPs per sample, "
        "%.3g by branching",
        args.text_tokens,
        args.answer_tokens,
        100 * args.differ,
        flops / 1e12,
        branched / 1e12,
    )
    fly = on_the_fly_flops(llava, prompt, 576, args.answer_tokens)
    logger.info(
        "LLaVA-1.5-7B on-the-fly labels (one exit layer per sample and step): %.3g TFLOPs per sample", fly / 1e12
    )
    logger.info(
        "| sustained TFLOP/s per GPU | hours per million samples on %d GPUs: label cache (every K), whole forward "
        "per K | label cache, by branching | on the fly, per epoch |",
        args.gpus,
    )
    logger.info("|---:|---:|---:|---:|")
    for tflops in args.tflops:
        rate = args.gpus * tflops * 1e12 * 3600
        logger.info("| %g | %.1f | %.1f | %.1f |", tflops, flops * 1e6 / rate, branched * 1e6 / rate, fly * 1e6 / rate)


if __name__ == "__main__":
    main()
