"""lmms-eval task definitions of dyvte's (``--include_path`` this folder): ``dyvte_demo``, the embedded demo's test
split, scored by exact match under dyvte's answer normalization (:mod:`dyvte.data.answers`)."""
