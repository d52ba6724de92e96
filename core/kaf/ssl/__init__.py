"""Self-supervised pretraining (METHODS.md A.4-A.5, B, C, D): one module per method on shared parts.

- data.py: unlabeled volumes as normalised slice stacks, with cached SIFT keypoints.
- views.py: views that carry their geometry back to the source slice, and the correspondences derived
  from it (transported points, overlap boxes, pixel pairs).
- losses.py: the shared loss primitives (masked InfoNCE in three denominator modes, BYOL regression,
  Sinkhorn matching).
- base.py: the method plug-in shape and the cross-rank communicator.
- kaf_method.py, gcl.py, pgl.py, dense.py: the four methods (KAF in two configurations: kaf,
  kaf-paper; GCL in two: gcl, the paper's, and gcl-shifted).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Sequence

from kaf.runtime import validation
from kaf.runtime.errors import InputDataError, KafError
from kaf.ssl.base import PretrainMethod

# name -> (module, class); imported on demand so that choosing one method does not import the others.
METHODS: dict[str, tuple[str, str]] = {
    "kaf": ("kaf.ssl.kaf_method", "KafPretraining"),
    "kaf-paper": ("kaf.ssl.kaf_method", "KafPaperPretraining"),  # the paper's settings (BENCHMARKS.md)
    "gcl": ("kaf.ssl.gcl", "GclPretraining"),
    "gcl-shifted": ("kaf.ssl.gcl", "GclShiftedPretraining"),  # translated local views (BENCHMARKS.md)
    "pgl": ("kaf.ssl.pgl", "PglPretraining"),
    "dense": ("kaf.ssl.dense", "DensePretraining"),
}


def _method_class(name: str) -> type[PretrainMethod]:
    if name not in METHODS:
        raise KafError(f"unknown pretraining method '{name}'; choose one of: {', '.join(METHODS)}")
    module_name, class_name = METHODS[name]
    return getattr(importlib.import_module(module_name), class_name)


def make_method(name: str, **config_overrides) -> PretrainMethod:
    """The pretraining method `name` with its paper defaults, optionally overriding config fields."""
    method_class = _method_class(name)
    return method_class(method_class.config_class(**config_overrides))


# Options that are also settings of their own, with the same range as the flag that sets them.
_OPTION_RANGES = {"view_size": validation.TRAINING_SIDE}


def parse_method_options(name: str, options: Sequence[str]) -> dict[str, bool | int | float]:
    """Config overrides from "FIELD=VALUE" texts (`kaf pretrain --method-option`): only the method's
    number and yes/no fields, each converted to its field's type and checked by the config itself."""
    config_class = _method_class(name).config_class
    settable = {
        f.name: type(f.default)
        for f in dataclasses.fields(config_class)
        if type(f.default) in (bool, int, float)
    }
    overrides: dict[str, bool | int | float] = {}
    for text in options:
        key, separator, value = text.partition("=")
        if not separator or key.strip() not in settable:
            raise InputDataError(
                f"--method-option {text!r}: give FIELD=VALUE with one of the {name} method's fields: "
                f"{', '.join(sorted(settable))}"
            )
        key = key.strip()
        overrides[key] = _option_value(text, value.strip(), settable[key])
        if key in _OPTION_RANGES:
            _OPTION_RANGES[key].check(overrides[key], f"--method-option {key}")
    try:
        config_class(**overrides)
    except ValueError as error:
        raise InputDataError(f"--method-option: {error}") from error
    return overrides


def _option_value(text: str, value: str, kind: type) -> bool | int | float:
    if kind is bool:
        if value.lower() not in ("true", "false"):
            raise InputDataError(f"--method-option {text!r}: the value must be true or false")
        return value.lower() == "true"
    try:
        number = kind(value)
    except ValueError as error:
        raise InputDataError(
            f"--method-option {text!r}: the value must be a{'n integer' if kind is int else ' number'}"
        ) from error
    if not math.isfinite(number):
        raise InputDataError(f"--method-option {text!r}: the value must be finite")
    return number
