"""The data path: records and their checks, prompts, conversation formats, sources (model, processor, records by
name) and video inputs without torchvision."""
