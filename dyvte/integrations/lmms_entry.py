"""The ``lmms_eval.models`` entry point: what lmms-eval 0.7 reads to know the model ``dyvte``.

lmms-eval builds its model registry when ``lmms_eval.models`` is imported (every run and every ``lmms-eval models``
call in the environment): it loads each entry point of the group ``lmms_eval.models`` and accepts a
``ModelManifest``, an iterable of them, or a callable returning one. This module is that callable's home and imports
nothing of dyvte's model code, so that the registry stays cheap to build; lmms-eval imports
:mod:`dyvte.integrations.lmms_eval` only when ``--model dyvte`` is asked for.
"""

from __future__ import annotations

#: the name ``--model`` takes
MODEL_ID = "dyvte"
#: the class lmms-eval instantiates (a "simple" model: prompts from ``doc_to_text``, images from ``doc_to_visual``)
CLASS_PATH = "dyvte.integrations.lmms_eval.DyVTELMM"


def manifest():
    """The ``ModelManifest`` of the model ``dyvte`` (the entry point ``dyvte`` in ``lmms_eval.models``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
