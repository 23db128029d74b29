"""The withdrawal engine (docs/design.md §4): hooks on unmodified HF modules, layouts, masks, KV caches,
grouped execution, the exit-policy protocol and the family registry. Imports no policy."""
