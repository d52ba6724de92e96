"""Self-supervised pretraining (METHODS.md A.4-A.5, B, C, D): one module per method on shared parts.

- data.py: unlabeled volumes as normalised slice stacks, with cached SIFT keypoints.
- views.py: views that carry their geometry back to the source slice, and the correspondences derived
  from it (transported points, overlap boxes, pixel pairs).
- losses.py: the shared loss primitives (masked InfoNCE in three denominator modes, BYOL regression,
  Sinkhorn matching).
- base.py: the method plug-in shape and the cross-rank communicator.
- kaf_method.py, gcl.py, pgl.py, dense.py: the four methods.
"""

from __future__ import annotations

import importlib

from kaf.runtime.errors import KafError
from kaf.ssl.base import PretrainMethod

# name -> (module, class); imported on demand so that choosing one method does not import the others.
METHODS: dict[str, tuple[str, str]] = {
    "kaf": ("kaf.ssl.kaf_method", "KafPretraining"),
    "gcl": ("kaf.ssl.gcl", "GclPretraining"),
    "pgl": ("kaf.ssl.pgl", "PglPretraining"),
    "dense": ("kaf.ssl.dense", "DensePretraining"),
}


def make_method(name: str, **config_overrides) -> PretrainMethod:
    """The pretraining method `name` with its paper defaults, optionally overriding config fields."""
    if name not in METHODS:
        raise KafError(f"unknown pretraining method '{name}'; choose one of: {', '.join(METHODS)}")
    module_name, class_name = METHODS[name]
    method_class = getattr(importlib.import_module(module_name), class_name)
    return method_class(method_class.config_class(**config_overrides))
