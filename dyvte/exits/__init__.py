"""What exit heads learn from and how their promise is kept: labels (by branching), label rules, Learn-then-Test
risk control, sharded label caches, on-the-fly labels, and VTW's KL calibration (``dyvte.calibrate``)."""
