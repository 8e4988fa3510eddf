"""What a method's configuration may hold: its names, the type of each value (that of
its default) and the range a number must lie in.

A job is the only place such a configuration comes from a user (the service's
``UNLEARND_METHOD_CONFIG``, ``unlearnd unlearn --config``, the bench's
``--method-config``), and a wrong value there either fails deep inside a method
after minutes of work (``"steps": "ten"``), or runs and reports success while
erasing nothing (``"steps": 0``), or turns an option on by accident
(``"project": "no"`` is a true value). :func:`config_problems` names every such
value before any work. Calling a method's ``unlearn`` directly stays lenient
(``loops.merged_config``); the job, the command line and the bench check first.
"""
from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

from . import method_defaults

#: parameters other methods' configurations may carry and every method accepts
SHARED = {"train"}  # the training recipe (TrainConfig fields), read by retrain

#: values a parameter takes besides those of its default's type: (method or "*", name) -> values
ALSO = {
    ("*", "grad_clip"): (None,),  # no clipping (the loops and the training recipe read it so)
    ("interference_aware", "orthogonalize"): ("iterate",),
    ("interference_aware", "tau_quantile_partial"): (None,),
    ("interference_aware", "tau_refresh_sample"): (None,),
}

#: where a number must lie: (method or "*", name) -> (low, high, low_inclusive), None for no
#: bound. Numbers not listed must be >= 0 (rates, weights, counts and clips are never negative).
RANGES = {
    ("*", "steps"): (1, None, True),
    ("*", "rounds"): (1, None, True),
    ("*", "batch_size"): (1, None, True),
    ("*", "forget_batch_size"): (1, None, True),
    ("*", "fisher_samples"): (1, None, True),
    ("*", "lr"): (0, None, False),
    ("*", "temperature"): (0, None, False),
    ("interference_aware", "shadow_folds"): (1, None, True),
    ("interference_aware", "subspace_samples"): (1, None, True),
    ("interference_aware", "tau_refresh_sample"): (1, None, True),
    ("interference_aware", "tau_quantile"): (0, 1, True),
    ("interference_aware", "tau_quantile_partial"): (0, 1, True),
    ("interference_aware", "energy"): (0, 1, False),
    ("neggrad_plus", "alpha"): (0, 1, True),
    ("salun", "gamma"): (0, 1, False),
    ("*", "shadow_seed"): (None, None, True),  # seeds: any integer (torch takes negative ones)
    # the training recipe (retrain; "train" for any method)
    ("retrain", "seed"): (None, None, True),
    ("retrain", "epochs"): (1, None, True),
    ("retrain", "width"): (1, None, True),
    ("retrain", "depth"): (1, None, True),
    ("retrain", "head_width"): (1, None, True),
}


def _range(method: str, name: str):
    return RANGES.get((method, name)) or RANGES.get(("*", name)) or (0, None, True)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _value_problem(method: str, name: str, value: Any, default: Any) -> str | None:
    """Why ``value`` cannot be parameter ``name`` of ``method`` (None when it can)."""
    also = ALSO.get((method, name), ()) + ALSO.get(("*", name), ())
    if (value is None and None in also) or (isinstance(value, str) and value in also):
        return None
    if default is None:
        return None  # free-form (a recipe, scores, levels): the method checks its shape
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if isinstance(default, (tuple, list)):
        if not (isinstance(value, (tuple, list)) and len(value) == len(default) and all(map(_is_number, value))):
            return f"must be a list of {len(default)} numbers, got {value!r}"
        return None
    if isinstance(default, str):
        return None if isinstance(value, str) else f"must be a string, got {value!r}"
    if isinstance(default, int):
        if not (isinstance(value, int) and not isinstance(value, bool)):
            return f"must be an integer, got {value!r}"
    elif isinstance(default, float):
        if not _is_number(value) or not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
    low, high, low_inclusive = _range(method, name)
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    if too_low or (high is not None and value > high):
        bound = " and ".join(([f"{'>=' if low_inclusive else '>'} {low}"] if low is not None else [])
                             + ([f"<= {high}"] if high is not None else []))
        return f"must be {bound}, got {value!r}"
    return None


#: parameters that hold a training recipe (TrainConfig fields) when set
RECIPES = {("interference_aware", "shadow_recipe")}


def _recipe_problems(recipe: Any, where: str | None) -> list[str]:
    """What is wrong with a training recipe given as ``where`` (None: retrain's top-level
    overrides, named as its parameters)."""
    from ..train import TrainConfig  # the training module is heavier; import on use

    if not isinstance(recipe, dict):
        return [f"{where} must be a mapping of training recipe fields, got {recipe!r}"]
    label = (lambda key: f"{where}[{key!r}]") if where else (lambda key: f"retrain parameter {key!r}")
    known = {f.name for f in fields(TrainConfig)}
    out = []
    unknown = sorted(set(recipe) - known)
    if unknown:
        out.append(f"{where} has no field {', '.join(map(repr, unknown))}; its fields: {sorted(known)}")
    default = TrainConfig()
    for key, value in recipe.items():
        if key in known:
            why = _value_problem("retrain", key, value, getattr(default, key))
            if why:
                out.append(f"{label(key)} {why}")
    return out


def config_problems(method: str, config: Any) -> list[str]:
    """Everything wrong with ``config`` for ``method``, one message per problem (empty
    when it is usable). Unknown names, values of another type than the default's
    (an integer where the default is one; a finite number; true or false), numbers out
    of range (``steps`` >= 1, ``lr`` > 0, quantiles in [0, 1], no negative weight),
    and for ``retrain`` (``train`` for any method) the recipe's fields."""
    if config is None:
        return []
    if not isinstance(config, dict):
        return [f"the configuration must be a mapping of parameter names to values, got {type(config).__name__}"]
    defaults = method_defaults(method)
    recipe_fields: set[str] = set()
    if method == "retrain":
        from ..train import TrainConfig

        recipe_fields = {f.name for f in fields(TrainConfig)}  # top-level recipe overrides (retrain's docstring)
    known = set(defaults) | SHARED | recipe_fields
    out = []
    unknown = sorted(set(config) - known)
    if unknown:
        out.append(f"method {method!r} has no parameter {', '.join(map(repr, unknown))}; "
                   f"its parameters: {sorted(known)}")
    for name, value in config.items():
        if name == "train":
            if value is not None:  # (None: no recipe given, as retrain reads it)
                out += _recipe_problems(value, "'train'")
        elif name in recipe_fields:
            out += _recipe_problems({name: value}, None)
        elif (method, name) in RECIPES and value is not None:
            out += _recipe_problems(value, f"{method} parameter {name!r}")
        elif name in defaults:
            why = _value_problem(method, name, value, defaults[name])
            if why:
                out.append(f"{method} parameter {name!r} {why}")
    return out
