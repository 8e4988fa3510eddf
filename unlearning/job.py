"""The one entry point the service worker calls: validate, unlearn, evaluate.

    result = run_unlearning_job(model, train, test, forget_cells, cache=cache_for_this_version)

``train`` is the training data the model reflects (earlier erasures already
removed), ``test`` held-out data (reference levels, membership-inference
non-members, test-set metrics). There is no retrained model in the service, so
the evaluation reports UIS and MIA AUC against the original model, not a
forget gap.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from .data.base import Cell, MultiTaskDataset
from .data.renderer import is_integer
from .evaluate import EvalContext, evaluate_unlearning
from .model import non_finite_tensors
from .methods import METHOD_NAMES, UnlearnData, check_method, get_method, prepare_method, prepare_share
from .methods.base import UnlearningDiverged
from .methods.params import config_problems
from .tasks import get_task
from .train import resident


class JobInputError(ValueError):
    """A job that cannot run as asked: bad cells, an empty forget set, a mismatched checkpoint."""


def check_finite(model, method: str) -> None:
    """:class:`UnlearningDiverged` naming the parameters with a NaN or an infinity."""
    state = model.state_dict()
    bad = non_finite_tensors(state)
    if bad:
        raise UnlearningDiverged(f"{method} left non-finite weights in {len(bad)} of {len(state)} tensors "
                                 f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); nothing to publish: "
                                 f"check the configuration (a smaller 'lr'?)")


@torch.no_grad()
def check_predictions_finite(model, images: torch.Tensor, method: str) -> None:
    """:class:`UnlearningDiverged` naming the tasks whose predictions on ``images`` hold a NaN
    or an infinity: weights can stay finite (huge, say) while the outputs overflow."""
    was_training = model.training
    model.eval()
    try:
        outputs = model(images)
    finally:
        model.train(was_training)
    bad = [task for task, out in outputs.items() if not bool(torch.isfinite(out).all())]
    if bad:
        raise UnlearningDiverged(f"{method} left a model whose {', '.join(bad)} predictions are not finite on "
                                 f"{len(images)} probe images (its weights are finite); nothing to publish: check the "
                                 f"configuration (a smaller 'lr'?)")


def _probe_images(train: MultiTaskDataset, test: MultiTaskDataset, cells: list[Cell], device) -> torch.Tensor:
    """The forgotten instances' images and up to 8 held-out ones, on ``device``."""
    forgotten = list(dict.fromkeys(iid for iid, _ in cells))
    parts = [train.images[[train.index_of(i) for i in forgotten]], test.images[:8]]
    return torch.cat([p.to(device) for p in parts])


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether ``a`` and ``b`` are one device ("cuda" is the current CUDA device, "cuda:0" say)."""
    def index(d: torch.device):
        return torch.cuda.current_device() if d.type == "cuda" and d.index is None else d.index

    return a.type == b.type and (a.type != "cuda" or index(a) == index(b))


def _job_device(model, device) -> torch.device:
    from .train import resolve_device

    if device is None:
        return next(model.parameters()).device
    try:
        return resolve_device(device)
    except RuntimeError as exc:  # an unknown device type, or CUDA asked for where there is none
        message = str(exc)
        raise JobInputError(message if message.startswith("device ") else f"device {device!r}: {message}") from None


@dataclass
class JobResult:
    """The unlearned model, its metrics (JSON-able), the method's log and the job's wall time."""

    model: torch.nn.Module
    metrics: dict[str, Any]
    log: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def validate_forget_cells(train: MultiTaskDataset, forget_cells: Iterable,
                          test: MultiTaskDataset | None = None) -> list[Cell]:
    """The forget cells as a de-duplicated list of ``(instance_id, task)`` tuples, in the
    order given: the order is part of a job's input, as its seed is (the same cells in
    another order give weights that differ by rounding). A set, which has no order of
    its own (a Python set's depends on the process's hash seed), is taken sorted.

    :class:`JobInputError` (a ValueError) for an empty set, a malformed cell, an
    unknown task, an unknown instance (one of ``test``, when given, is named as
    held-out) or a cell that is already erased.
    """
    if isinstance(forget_cells, str):  # iterated, it would be its characters
        raise JobInputError(f"the forget set is a list of (instance_id, task) cells, got the string {forget_cells!r}")
    if isinstance(forget_cells, tuple) and len(forget_cells) == 2 and all(isinstance(x, str) for x in forget_cells):
        raise JobInputError(f"the forget set is a list of (instance_id, task) cells, got one cell {forget_cells!r}: "
                            f"pass [{forget_cells!r}]")
    cells: list[Cell] = []
    for cell in (forget_cells if forget_cells is not None else []):  # (a numpy array has no truth value)
        if not isinstance(cell, (tuple, list)) or len(cell) != 2:
            raise JobInputError(f"a forget cell is an (instance_id, task) pair, got {cell!r}")
        cells.append((str(cell[0]), str(cell[1])))
    cells = sorted(set(cells)) if isinstance(forget_cells, (set, frozenset)) else list(dict.fromkeys(cells))
    if not cells:
        raise JobInputError("the forget set is empty: no (instance_id, task) cell to erase")
    try:
        return train.check_cells(cells)
    except KeyError as exc:  # unknown instance
        held_out = sorted({iid for iid, _ in cells if iid not in train.instance_ids}
                          & set(test.instance_ids if test is not None else ()))
        if held_out:
            raise JobInputError(f"instance {held_out[0]!r} is in the test set: held-out data the model was not "
                                "trained on, so there is nothing of it to erase") from None
        raise JobInputError(exc.args[0] if exc.args else str(exc)) from None
    except ValueError as exc:  # unknown task, already erased
        raise JobInputError(str(exc)) from None


def check_model_matches(model, train: MultiTaskDataset, test: MultiTaskDataset | None = None,
                        name: str = "test") -> None:
    """:class:`JobInputError` when the checkpoint's tasks, output or input channels, or the dtype of
    its parameters, do not match the data; ``name`` is what the messages call ``test`` (a
    held-out ``reference``, say)."""
    model_tasks = list(getattr(model, "tasks", []))
    if sorted(model_tasks) != sorted(train.tasks):
        raise JobInputError(
            f"checkpoint does not match the dataset: model tasks {model_tasks}, dataset {train.name!r} tasks {train.tasks}"
        )
    for t in train.tasks:
        want = get_task(t).out_channels(train.num_classes)
        have = model.config.tasks.get(t)
        if have != want:
            raise JobInputError(
                f"checkpoint does not match the dataset: head {t!r} has {have} output channels, dataset needs {want}"
            )
        if test is not None and t in test.tasks and get_task(t).out_channels(test.num_classes) != want:
            raise JobInputError(f"the {name} set does not match the training set: {t!r} of {test.name!r} needs "
                                f"{get_task(t).out_channels(test.num_classes)} output channels ({test.num_classes} "
                                f"classes), of {train.name!r} {want} ({train.num_classes} classes)")
    in_channels = getattr(model.config, "in_channels", None)
    for which, data in (("training", train), (name, test)):
        if data is not None and in_channels is not None and data.images.shape[1] != in_channels:
            raise JobInputError(f"checkpoint does not match the dataset: the model takes {in_channels}-channel images, "
                                f"the {which} images of {data.name!r} have {data.images.shape[1]}")
    # a float64 (or half) model on float32 images fails inside its first convolution, mid-job
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    for which, data in (("training", train), (name, test)):
        if data is not None and dtypes and dtypes != [str(data.images.dtype)]:
            raise JobInputError(f"checkpoint does not match the dataset: the model's parameters are "
                                f"{', '.join(dtypes)}, the {which} images of {data.name!r} are {data.images.dtype}")
    if test is not None and list(test.tasks) != list(train.tasks):
        raise JobInputError(f"{name} tasks {test.tasks} differ from training tasks {train.tasks}")
    if test is not None and train.image_size != test.image_size:
        raise JobInputError(f"train images {train.image_size} and {name} images {test.image_size} differ in size")


def check_reference(model, train: MultiTaskDataset, reference: MultiTaskDataset,
                    test: MultiTaskDataset | None = None) -> None:
    """:class:`JobInputError` when a method's held-out ``reference`` is empty, does not match
    the checkpoint or the training data, holds a training instance (held-out data it is not),
    or shares some but not all of ``test``'s instances (the audit's non-members: a reference
    of its own is apart from them, and the test set itself is no reference of its own)."""
    if len(reference) == 0:
        raise JobInputError("the held-out reference is empty: interference_aware's levels come from it; "
                            "leave it out to use the test set")
    check_model_matches(model, train, reference, name="reference")
    def some(ids: set[str]) -> str:  # the first three, and how many more
        ids = sorted(ids)
        return ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")

    shared = set(reference.instance_ids) & set(train.instance_ids)
    if shared:
        raise JobInputError(f"the held-out reference holds training instances ({some(shared)}): "
                            f"held-out data is data the model was not trained on")
    overlap = set(reference.instance_ids) & set(test.instance_ids) if test is not None else set()
    if overlap and reference.instance_ids != test.instance_ids:
        raise JobInputError(f"the held-out reference shares instances with the test set ({some(overlap)}), where "
                            f"the audit's attack takes its non-members: give held-out data apart from it, or leave "
                            f"the reference out to use the test set")


def _eval_context(cache: dict, model, train, test, device) -> EvalContext:
    """The cached :class:`EvalContext` of this model version, or a new one.

    The caller keeps ``cache`` per model version, so a context built for the
    same training and test data holds this version's numbers even when the
    model was loaded again (a new object): it is re-pointed at ``model`` and at
    this job's copies of the data (on the device, when they were kept there).
    """
    ctx = cache.get("eval_context")
    if isinstance(ctx, EvalContext) and ctx.train.same_cells(train) and ctx.test.instance_ids == test.instance_ids:
        ctx.original = model
        ctx.device = device
        ctx.train, ctx.test = train, test
        return ctx
    ctx = EvalContext(model, train, test, device=device)
    cache["eval_context"] = ctx
    return ctx


def on_device(cache: dict, name: str, dataset: MultiTaskDataset, device: torch.device) -> MultiTaskDataset:
    """``dataset`` on a CUDA ``device`` (:func:`~unlearning.train.resident`: when it takes
    under a quarter of the free memory), kept in the per-version ``cache`` under
    ``("resident", name)`` so the next job on the version finds it there.

    Without it every batch a method or the evaluation takes is gathered on the host
    and copied over, a job's training data many times over (a 200-step job takes
    about 30 scenes a step). A cached copy is reused for data with the same
    instances and cells, as the evaluation context is; on the CPU ``dataset`` itself."""
    if device.type != "cuda":
        return dataset
    key = ("resident", name)
    held = cache.get(key)
    if held is not None and (held[0] is dataset or held[0].same_cells(dataset)):
        return held[1]
    placed = resident(dataset, device)
    cache[key] = (dataset, placed)
    return placed


def release_device_data(cache: dict) -> int:
    """Drop the device copies of the data that :func:`on_device` keeps in a per-version
    ``cache`` and point the cached evaluation context back at the host data; the rest
    of the cache (τ, features, the original model's numbers) stays. Returns how many
    copies were dropped.

    A worker keeps the caches of several versions, but jobs run on the newest: without
    this each cached version would hold a copy of the training and test data on the
    GPU (~6 GB at the ``full`` suite's size). If a job runs on a released version
    again, :func:`on_device` copies the data over again."""
    dropped = 0
    ctx = cache.get("eval_context")
    for key in [k for k in cache if isinstance(k, tuple) and len(k) == 2 and k[0] == "resident"]:
        host, placed = cache.pop(key)
        if placed is not host:
            dropped += 1
        if isinstance(ctx, EvalContext):
            if key[1] == "train" and ctx.train is placed:
                ctx.train = host
            if key[1] == "test" and ctx.test is placed:
                ctx.test = host
    return dropped


def _per_task(evaluation: dict) -> dict[str, dict[str, dict[str, float]]]:
    """``{set: {task: metrics}}`` of the unlearned model (sets: test, retained, forgotten)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for g in evaluation.get("groups", []):
        out.setdefault(g["set"], {})[g["task"]] = g["unlearned"]
    return out


def check_config(method: str, config: dict | None) -> None:
    """Refuse a configuration the method cannot run as meant, before any work: names it
    does not have (a typo would otherwise be ignored and the job run with the default),
    values of the wrong type or out of range (``steps`` 0 would report an erasure that
    erased nothing). ``train`` (the training recipe, read by ``retrain``) is accepted
    for every method. See :mod:`unlearning.methods.params`."""
    problems = config_problems(method, config)
    if problems:
        raise JobInputError("; ".join(problems))


def run_unlearning_job(
    model,
    train: MultiTaskDataset,
    test: MultiTaskDataset,
    forget_cells: Iterable,
    method: str = "interference_aware",
    config: dict | None = None,
    device=None,
    seed: int = 0,
    cache: dict | None = None,
    progress: Callable[[float], None] | None = None,
    keep_data_on_device: bool = True,
    reference: MultiTaskDataset | None = None,
) -> JobResult:
    """Erase ``forget_cells`` from ``model`` with ``method`` and evaluate the result.

    Validation (before any work): the forget set is non-empty, every cell names
    a task of ``train`` and an instance still in it, and is not already erased;
    the model's heads match ``train``'s tasks and channels; the configuration's
    names, types and ranges (:mod:`unlearning.methods.params`); the device and seed.
    Errors are :class:`JobInputError` (a ValueError) naming the culprit; an unknown
    method is a KeyError naming the known ones. A method that leaves a NaN or an
    infinity in the weights, or in the predictions on the forgotten instances and
    8 held-out images, raises :class:`UnlearningDiverged` instead of returning
    the model.

    ``cache`` is a dict the caller keeps per model version. It holds what
    depends only on the version and the data it reflects: under ``"engine"``
    the method's reference levels τ, task subspaces and representation
    features (``data.cache``), under ``"eval_context"`` the original model's
    metrics on the test set and retained sample and its held-out losses. A
    method with a ``prepare`` hook fills its part first; the time that takes
    (0 when the cache is warm) is ``metrics["cache_seconds"]``.

    Timing: ``seconds`` (and ``metrics["seconds"]``) is the whole call's wall
    time, validation, cache filling, unlearning and evaluation included;
    ``metrics["unlearn_seconds"]`` is the method alone, ``eval_seconds`` the
    evaluation alone.

    ``config`` is passed to the method (missing keys take its defaults);
    ``progress`` receives a fraction in [0, 1] (the method covers 0-0.9; with a cache
    still to fill at length, the shadow calibration's models say, the method's
    ``prepare`` takes the first part of that, in proportion to its optimiser steps).

    ``reference``: the held-out data the method reads (interference_aware's levels τ,
    their refreshes, its shadow calibration's scores), in place of ``test``, which stays
    the evaluation's data and the membership attack's non-members. Without it the method
    reads ``test`` too (the design's setup), and the audit's ``mia_auc`` then ranks the
    forgotten cells among the data their levels came from (benchmarks/README.md, "A
    held-out reference of its own"). :func:`unlearning.data.load_reference` renders
    such scenes for a synthetic dataset. ``metrics["reference"]`` says which it was.

    On a CUDA ``device`` the training and test data are copied there once and
    kept in ``cache`` (:func:`on_device`) unless ``keep_data_on_device`` is false;
    the batches are the same either way, only where they are gathered differs. A
    model elsewhere than ``device`` is copied there: the caller's model is not moved.
    """
    start = time.perf_counter()
    if method not in METHOD_NAMES:
        get_method(method)  # raises KeyError naming the known methods
    cells = validate_forget_cells(train, forget_cells, test)
    check_model_matches(model, train, test)
    check_config(method, config)
    if test is None or len(test) == 0:
        raise JobInputError("the test set is empty: the audit's membership inference compares the forgotten cells "
                            "with held-out data, and interference_aware's levels come from it")
    shared = sorted(set(test.instance_ids) & set(train.instance_ids))
    if shared:  # members counted among the non-members: the audit's AUC would be measured against itself
        more = f" and {len(shared) - 3} more" if len(shared) > 3 else ""
        raise JobInputError(f"the test set holds training instances ({', '.join(shared[:3])}{more}): the audit's "
                            "membership inference takes its non-members from it, which must be data the model "
                            "was not trained on")
    if reference is not None:
        check_reference(model, train, reference, test)
        if reference.instance_ids == test.instance_ids:
            reference = None  # the test set itself: the default, and said so
    erased = set(cells)
    if all(c in erased for c in train.cells()):
        raise JobInputError(f"erasing these {len(cells)} cells leaves no training data: every cell of "
                            f"{train.name!r} would be erased, and there is nothing to keep the model's tasks on")
    if not is_integer(seed):  # numpy's integers are integers too, bools are not
        raise JobInputError(f"seed must be an integer, got {seed!r}")
    from .cli import METHOD_SEEDS

    if int(seed) not in METHOD_SEEDS:  # the methods seed torch with seed * 1_000_003 + salt
        raise JobInputError(f"seed {seed} is out of range: a job's seed is an integer from {METHOD_SEEDS.start} "
                            f"to {METHOD_SEEDS.stop - 1}")
    device = _job_device(model, device)
    cache = {} if cache is None else cache
    engine_cache = cache.setdefault("engine", {})
    if keep_data_on_device:
        train, test = on_device(cache, "train", train, device), on_device(cache, "test", test, device)
        if reference is not None:
            reference = on_device(cache, "reference", reference, device)

    def report(fraction: float) -> None:
        if progress is not None:
            progress(max(0.0, min(1.0, float(fraction))))

    data = UnlearnData(
        train=train,
        forget_cells=cells,
        retain=train.without(cells),
        heldout=test if reference is None else reference,
        device=device,
        seed=int(seed),
        cache=engine_cache,
        progress=lambda f: report(0.9 * f),
    )
    if not all(_same_device(p.device, device) for p in model.parameters()):
        model = copy.deepcopy(model).to(device)  # Module.to moves in place: the caller's model stays put
    cfg = dict(config or {})

    try:
        check_method(method, data, cfg)
    except ValueError as exc:
        raise JobInputError(str(exc)) from None
    t_cache = time.perf_counter()
    share = prepare_share(method, model, data, cfg)  # e.g. shadow models still to train: the bar moves meanwhile
    data.progress = lambda f: report(0.9 * share * f)
    prepare_method(method, model, data, cfg)
    data.progress = lambda f: report(0.9 * (share + (1.0 - share) * f))
    cache_seconds = time.perf_counter() - t_cache

    t_unlearn = time.perf_counter()
    unlearned, log = get_method(method)(model, data, cfg)
    check_finite(unlearned, method)
    check_predictions_finite(unlearned, _probe_images(train, test, cells, device), method)
    unlearn_seconds = time.perf_counter() - t_unlearn
    report(0.9)

    t_eval = time.perf_counter()
    context = _eval_context(cache, model, train, test, device)
    evaluation = evaluate_unlearning(model, unlearned, train, cells, test, context=context, device=device)
    eval_seconds = time.perf_counter() - t_eval
    seconds = time.perf_counter() - start
    report(1.0)

    metrics = {
        "uis": evaluation["uis"],
        "uis_task": evaluation["uis_task"],
        "uis_inst": evaluation["uis_inst"],
        "mia_auc": evaluation["mia_auc"],
        "mia_auc_original": evaluation["mia_auc_original"],
        "mia_tasks": evaluation["mia_tasks"],  # the forgotten tasks the attack compared
        "per_task": _per_task(evaluation),
        "mode": evaluation["mode"],
        "forget_tasks": evaluation["forget_tasks"],
        "forget_loss": evaluation["forget_loss"],
        "method": method,
        "seconds": round(seconds, 4),
        "unlearn_seconds": round(unlearn_seconds, 4),
        "eval_seconds": round(eval_seconds, 4),
        "cache_seconds": round(cache_seconds, 4),
        "forget_cells": [list(c) for c in cells],
        # the held-out data the method read: the test split (the attack's non-members too) or its own
        "reference": {"source": "test_split" if reference is None else "own", "instances": len(data.heldout)},
    }
    calibration = log.get("calibration") if isinstance(log, dict) else None
    if calibration and calibration.get("expected_mia_auc") is not None:
        # the MIA AUC a model retrained without these cells is expected to show (shadow calibration)
        metrics["mia_auc_expected"] = calibration["expected_mia_auc"]
    return JobResult(model=unlearned, metrics=metrics, log=log, seconds=seconds)


__all__ = ["JobResult", "JobInputError", "run_unlearning_job", "validate_forget_cells", "check_model_matches"]
