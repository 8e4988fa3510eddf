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

from ..cli import SHADOW_SEEDS, TORCH_SEEDS, short_repr
from . import method_choices, method_defaults

#: parameters other methods' configurations may carry and every method accepts
SHARED = {"train"}  # the training recipe (TrainConfig fields), read by retrain

#: values a parameter takes besides those of its default's type: (method or "*", name) -> values
ALSO = {
    ("*", "grad_clip"): (None,),  # no clipping (the loops and the training recipe read it so); 0, a number in
    # range (>= 0), is no clipping too: both read it as a truth value (``if grad_clip:``)
    ("interference_aware", "orthogonalize"): ("iterate",),
    ("interference_aware", "tau_quantile_partial"): (None,),
    ("interference_aware", "tau_refresh_sample"): (None,),
}

#: parameters whose default is None (off) that otherwise take a value of this type
#: (the value shown is only its type's prototype): (method, name) -> prototype
WHEN_SET = {
    ("interference_aware", "shadow_trained_folds"): 1,
    ("scrub", "min_steps"): 1,
}

#: where a number must lie: (method or "*", name) -> (low, high, low_inclusive[, high_inclusive]),
#: None for no bound; a list's numbers each (``betas``). Numbers not listed must be >= 0 (rates, weights,
#: counts and clips are never negative).
RANGES = {
    ("*", "steps"): (1, None, True),
    ("*", "rounds"): (1, None, True),
    ("*", "batch_size"): (1, None, True),
    ("*", "forget_batch_size"): (1, None, True),
    ("*", "fisher_samples"): (1, None, True),
    ("*", "lr"): (0, None, False),
    ("*", "temperature"): (0, None, False),
    ("*", "momentum"): (0, 1, True, False),  # SGD's (loops.make_optimizer): in [0, 1)
    ("interference_aware", "shadow_folds"): (2, None, True),  # one fold: the full-mode shadow trains on nothing
    ("interference_aware", "max_norm"): (0, None, False),  # sgd: the update's norm is divided by it
    ("interference_aware", "subspace_samples"): (1, None, True),
    ("interference_aware", "tau_refresh_sample"): (1, None, True),
    ("interference_aware", "tau_quantile"): (0, 1, True),
    ("interference_aware", "tau_quantile_partial"): (0, 1, True),
    ("interference_aware", "energy"): (0, 1, False),
    ("interference_aware", "shadow_trained_folds"): (1, None, True),
    ("interference_aware", "betas"): (0, 1, True, False),  # Adam's: each in [0, 1)
    ("neggrad_plus", "alpha"): (0, 1, True, False),  # 1: no forget term (WHY)
    ("pcgrad", "forget_weight"): (0, None, False),  # 0: no forget gradient (WHY)
    ("salun", "gamma"): (0, 1, False),
    ("scrub", "min_steps"): (1, None, True),
    ("scrub", "max_rounds"): (2, None, True),  # the first max-step makes no update (WHY)
    ("scrub", "rounds"): (2, None, True),  # likewise: max-steps are taken in the first min(rounds, max_rounds) rounds
    # seeds: what torch takes once the code's offset is added (negative ones too); beyond
    # that, "Overflow when unpacking long long" from inside the work (unlearning.cli)
    ("*", "shadow_seed"): (SHADOW_SEEDS.start, SHADOW_SEEDS[-1], True),  # the folds' split: 7_919 + seed
    # the training recipe (retrain; "train" for any method)
    ("retrain", "seed"): (TORCH_SEEDS.start, TORCH_SEEDS[-1], True),  # torch.manual_seed(seed), as it is
    ("retrain", "epochs"): (1, None, True),
    ("retrain", "width"): (1, None, True),
    ("retrain", "depth"): (1, None, True),
    ("retrain", "head_width"): (1, None, True),
}


#: why a bound is where it is, where the bare bound would puzzle: (method, name) -> reason,
#: appended to the range's message
WHY = {
    ("scrub", "max_rounds"): ("the first max-step makes no update (the student is still the teacher), so "
                              "max_rounds 1 gives the weights of max_rounds 0: retain training, no forgetting"),
    ("neggrad_plus", "alpha"): ("the forget loss is weighed by 1 - alpha, so alpha 1 is retain training with no "
                                "forget signal"),
    ("pcgrad", "forget_weight"): ("the update is forget_weight * g_f' + g_r', so forget_weight 0 is retain training "
                                  "with no forget signal"),
    ("scrub", "rounds"): ("only the first min(rounds, max_rounds) rounds take a max-step and the first max-step "
                          "makes no update (the student is still the teacher), so rounds 1 forgets nothing"),
}


def _range(method: str, name: str):
    return RANGES.get((method, name)) or RANGES.get(("*", name)) or (0, None, True)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    """A number a float holds, finite: JSON reads 1000...0 (401 digits) as an int that no
    float holds, and math.isfinite raised OverflowError on it."""
    try:
        return _is_number(value) and math.isfinite(value)
    except OverflowError:
        return False


def _value_problem(method: str, name: str, value: Any, default: Any) -> str | None:
    """Why ``value`` cannot be parameter ``name`` of ``method`` (None when it can)."""
    also = ALSO.get((method, name), ()) + ALSO.get(("*", name), ())
    if (value is None and None in also) or (isinstance(value, str) and value in also):
        return None
    if default is None and value is not None and (method, name) in WHEN_SET:
        default = WHEN_SET[(method, name)]
    if default is None:
        check = SHAPES.get((method, name))
        return None if check is None or value is None else check(value)  # else free-form: the method checks
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if isinstance(default, (tuple, list)):
        if not (isinstance(value, (tuple, list)) and len(value) == len(default)
                and all(_finite(v) for v in value)):
            return f"must be a list of {len(default)} finite numbers, got {value!r}"
        out_of_range = [_range_problem(method, name, v) for v in value]
        return next((f"{why} (each)" for why in out_of_range if why), None)
    if isinstance(default, str):
        if not isinstance(value, str):
            return f"must be a string, got {value!r}"
        choices = method_choices(method).get(name)  # the method's module names them (its CHOICES)
        if choices is not None and value not in choices + also:
            return f"must be one of {', '.join(map(repr, choices + also))}, got {value!r}"
        return None
    if isinstance(default, int):
        if not (isinstance(value, int) and not isinstance(value, bool)):
            return f"must be an integer, got {value!r}"
    elif isinstance(default, float):
        if not _finite(value):
            return f"must be a finite number, got {value!r}"
    why = _range_problem(method, name, value)
    return f"{why}: {WHY[method, name]}" if why and (method, name) in WHY else why


def _range_problem(method: str, name: str, value) -> str | None:
    low, high, low_inclusive, high_inclusive = (*_range(method, name), True)[:4]
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        bound = " and ".join(([f"{'>=' if low_inclusive else '>'} {low}"] if low is not None else [])
                             + ([f"{'<=' if high_inclusive else '<'} {high}"] if high is not None else []))
        return f"must be {bound}, got {value!r}"
    return None


def _levels_problem(value: Any) -> str | None:
    """interference_aware's fixed ``tau``: a {task: level} mapping of positive numbers (that
    it names every forgotten task, the job checks once it knows them)."""
    if not isinstance(value, dict) or not all(isinstance(t, str) for t in value):
        return f"must be a {{task: level}} mapping, got {value!r}"
    bad = {t: v for t, v in value.items() if not _finite(v) or v <= 0}
    return f"must give each task a positive finite level, got {bad}" if bad else None


#: the tables of interference_aware's ``shadow_scores`` (one per erasure mode)
SCORE_TABLES = ("full", "partial")


def _scores_problem(value: Any) -> str | None:
    """interference_aware's ``shadow_scores``: a mapping whose ``"full"`` and ``"partial"``
    tables (either absent or null: no score in that mode) are ``{instance id: {task: score}}``
    with each score a number in [0, 1], an attack-AUC contribution. NaN is taken too: it is
    what ``shadow_scores()`` writes for a cell it could not score (a cell without a labelled
    pixel, a task without a finite held-out loss), and the method reads it as unscored. The
    other keys ``shadow_scores()`` returns (``folds``, ``extrapolated``, ...) and those of the
    service's stored calibration (``recipe``, ``sha256``, ...) are not read, so not checked.
    A wrong value used to fail inside the method (a string: AttributeError; NaN in the
    only score of a task: torch's quantile) or to pass (5: an expected MIA AUC of 5)."""
    if not isinstance(value, dict):
        return (f"must be a mapping with 'full' and 'partial' tables of {{instance id: {{task: score}}}} "
                f"(what interference_aware.shadow_scores returns), got {short_repr(value)}")
    bad = []
    for mode in SCORE_TABLES:
        table = value.get(mode)
        if table is None:
            continue
        if not isinstance(table, dict):
            bad.append(f"[{mode!r}] must be a mapping of {{instance id: {{task: score}}}}, got {short_repr(table)}")
            continue
        for iid, scores in table.items():
            if not isinstance(iid, str) or not isinstance(scores, dict):
                bad.append(f"[{mode!r}][{short_repr(iid)}] must be an instance id (a string) mapped to "
                           f"{{task: score}}, got {short_repr(scores)}")
                continue
            for task, score in scores.items():
                if not isinstance(task, str):
                    bad.append(f"[{mode!r}][{iid!r}] must be keyed by task names, got {short_repr(task)}")
                elif not (isinstance(score, float) and math.isnan(score)) and not (_finite(score) and 0 <= score <= 1):
                    bad.append(f"[{mode!r}][{iid!r}][{task!r}] must be a score in [0, 1], got {short_repr(score)}")
    if not bad:
        return None
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return f"{bad[0]}{more}"


#: checks of parameters whose default is None and whose value has a shape of its own
SHAPES = {
    ("interference_aware", "tau"): _levels_problem,
    ("interference_aware", "shadow_scores"): _scores_problem,
}


#: TrainConfig fields retrain takes from the model, not from its configuration (in ``train``,
#: a manifest's recipe, they are read over; as top-level overrides they are refused)
ARCHITECTURE = ("width", "depth", "head_width")

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
    unknown = sorted(set(config) - known, key=repr)  # a library caller's key may be no string
    if unknown:
        out.append(f"method {method!r} has no parameter {', '.join(map(repr, unknown))}; "
                   f"its parameters: {sorted(known)}")
    for name, value in config.items():
        if name == "train":
            if value is not None:  # (None: no recipe given, as retrain reads it)
                out += _recipe_problems(value, "'train'")
        elif name in recipe_fields and name in ARCHITECTURE:  # retrain: the architecture is the model's
            out.append(f"retrain parameter {name!r} cannot be set: the retrained model has the deployed "
                       f"model's architecture ({', '.join(ARCHITECTURE)} come from its checkpoint)")
        elif name in recipe_fields:
            out += _recipe_problems({name: value}, None)
        elif (method, name) in RECIPES and value is not None:
            out += _recipe_problems(value, f"{method} parameter {name!r}")
        elif name in defaults:
            why = _value_problem(method, name, value, defaults[name])
            if why:
                out.append(f"{method} parameter {name!r} {why}")
    if not out:
        out += _combination_problems(method, {**defaults, **config})
    return out


def _combination_problems(method: str, cfg: dict) -> list[str]:
    """Values each valid alone that do not go together."""
    out = []
    if method == "interference_aware":
        trained, folds = cfg.get("shadow_trained_folds"), cfg.get("shadow_folds")
        if trained is not None and folds is not None and trained > folds:
            out.append(f"interference_aware parameter 'shadow_trained_folds' ({trained}) must be at most "
                       f"'shadow_folds' ({folds})")
        if cfg.get("orthogonalize_impl") == "batched" and cfg.get("orthogonalize") == "iterate":
            out.append("interference_aware parameter 'orthogonalize_impl' 'batched' does one projection; "
                       "'orthogonalize' 'iterate' has only the 'per_tensor' implementation")
    return out
