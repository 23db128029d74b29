"""The embedded demo: a small LLaVA-1.5-architecture MLLM trained here on "digit scenes" (real handwritten digits)."""

from dyvte.demo.data import QTYPES, DatasetSizes, SceneConfig, build_dataset, iter_records, render_scene
from dyvte.demo.model import (
    DemoModelConfig,
    build_model,
    build_processor,
    demo_checkpoint_dir,
    extract_answer,
    format_prompts,
    generate_answers,
    load_demo_dataset,
    load_demo_model,
    load_demo_processor,
    num_image_tokens,
    prepare_generation_inputs,
)

__all__ = [
    "QTYPES",
    "DatasetSizes",
    "DemoModelConfig",
    "SceneConfig",
    "build_dataset",
    "build_model",
    "build_processor",
    "demo_checkpoint_dir",
    "extract_answer",
    "format_prompts",
    "generate_answers",
    "iter_records",
    "load_demo_dataset",
    "load_demo_model",
    "load_demo_processor",
    "num_image_tokens",
    "prepare_generation_inputs",
    "render_scene",
]
