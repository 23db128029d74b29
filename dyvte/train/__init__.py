"""Training on the frozen model (needs ``dyvte[train]``): the exit-head DataModule and its option groups, the
heads-only LightningModule, run folders, and withdrawal-aware LoRA."""
