"""Visual-token pruning: FasterVLM and random before the LLM (``Pruning``), FastV through the engine, and the
registry of pruning methods (``dyvte.prune``)."""
