"""Erase training cells from a checkpoint, without the service: the engine alone.

    python -m unlearning.unlearn --checkpoint runs/indoor --instance indoor-00007 --out runs/indoor-erased
    python -m unlearning.unlearn --checkpoint runs/indoor-erased --instance indoor-00012 --tasks depth \\
        --out runs/indoor-erased-2            # partial-task: only the depth cell of indoor-00012

The checkpoint is a directory written by ``python -m unlearning.train`` (or by this
command): ``model.safetensors`` plus ``config.json``, whose ``dataset`` spec names the
training data and whose ``erased`` list (absent: none) the cells its lineage already
erased; or a version folder of the service's model store, whose ``manifest.json`` holds
the same (see :func:`read_checkpoint`). The job is :func:`unlearning.job.run_unlearning_job`, as the service's worker
runs it: the forget cells are validated first (unknown instance or task, a cell erased
earlier, an empty set: an error naming it, nothing written), then the method runs on the
training data minus every earlier erasure, and the result is evaluated (UIS, MIA AUC
against the source checkpoint).

The output is a new checkpoint directory (never the source, never a directory that
already holds files), written to a temporary sibling and renamed into place, so a
failed job leaves nothing behind. Its ``config.json`` carries the dataset spec and the
training recipe over, ``erased`` = the source's plus this job's cells, and appends one
entry to ``lineage``: the source directory and its weights' SHA-256, the method, its
configuration, the seed and the job's metrics. The metrics are printed as JSON.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm

from .cli import (METHOD_SEEDS, CliError, Writes, check_output_dir, check_seed, is_sha256, json_type, read_json,
                  report_cli_error, report_interrupted, short_repr, write_dir_atomically)
from .jsonio import finite_json, loads_strict
from .model import CONFIG_FILE, WEIGHTS_FILE
from .resources import data_needs, memory_shortfall

METRIC_KEYS = ("mode", "forget_tasks", "uis", "uis_task", "uis_inst", "mia_auc", "mia_auc_original",
               "mia_auc_expected", "seconds", "unlearn_seconds", "eval_seconds", "reference")


class UnlearnCliError(CliError):
    """A request this command refuses before any work (the message names what is wrong).
    The shared helpers of :mod:`unlearning.cli` raise its base, :class:`CliError`."""


def parse_cell(text: str) -> tuple[str, str]:
    """``INSTANCE:TASK`` (split at the last colon) as a cell."""
    iid, sep, task = text.rpartition(":")
    if not sep or not iid or not task:
        raise UnlearnCliError(f"--cell takes INSTANCE:TASK, got {text!r}")
    return iid, task


def check_request(instances, only_tasks, cells) -> list | None:
    """``cells`` as a list (a generator is read once, here); :class:`UnlearnCliError` unless
    ``instances`` and ``only_tasks`` (None or lists of strings) and ``cells`` (None or a list
    of ``(instance_id, task)`` pairs) have the shape :func:`unlearn_checkpoint` takes.
    Iterated, a string was its characters ("unknown instance 'i'"), one cell its two ids, a
    dict its keys, and a cell of three items was cut to two and erased."""
    for name, value, what in (("instances", instances, "instance ids"), ("only_tasks", only_tasks, "task names")):
        if isinstance(value, str):
            raise UnlearnCliError(f"{name} is a list of {what}, got the string {value!r}: pass [{value!r}]")
    if cells is None:
        return None
    if isinstance(cells, tuple) and len(cells) == 2 and all(isinstance(x, str) for x in cells):
        raise UnlearnCliError(f"cells is a list of (instance_id, task) pairs, got one cell {cells!r}: pass [{cells!r}]")
    if isinstance(cells, (str, dict)):
        raise UnlearnCliError(f"cells is a list of (instance_id, task) pairs, got "
                              f"{'the string ' + repr(cells) if isinstance(cells, str) else 'a dict'}")
    cells = list(cells)
    for cell in cells:
        if not isinstance(cell, (tuple, list)) or len(cell) != 2:
            raise UnlearnCliError(f"a cell is an (instance_id, task) pair, got {cell!r}")
    return cells


def forget_cells(tasks: list[str], instances: list[str], only_tasks: list[str] | None,
                 cells: list[tuple[str, str]], erased=()) -> list[tuple[str, str]]:
    """Every instance of ``instances`` with each of ``only_tasks`` (when None: each of
    ``tasks`` not yet ``erased`` for it, so an instance erased from some tasks before is
    erased from the rest; all of them when none is left, which the caller refuses as
    erased), then ``cells``, without repeats. Unknown tasks and instances are left to the
    job's validation, which names them."""
    if only_tasks and not instances:
        raise UnlearnCliError("--tasks selects tasks of the --instance arguments; none was given")
    erased = set(erased)
    out = []
    for iid in instances:
        mine = [(iid, t) for t in (only_tasks or tasks)]
        out += mine if only_tasks else ([c for c in mine if c not in erased] or mine)
    out += [(str(c[0]), str(c[1])) for c in cells]
    return list(dict.fromkeys(out))


def method_config(text: str | None) -> dict:
    """``--config``: a JSON object, inline or the path of a file holding one. Text that
    starts with ``{`` or ``[`` is inline JSON; an existing file, or text that looks like a
    path (it ends with ``.json`` or holds a ``/``), is a file, and a missing one is named
    as such; anything else is inline JSON."""
    if not text:
        return {}
    stripped = text.strip()
    path = Path(text)
    if not stripped.startswith(("{", "[")) and (path.exists() or stripped.lower().endswith(".json")
                                                   or "/" in stripped or "\\" in stripped):
        value = read_json(path, "--config file")
    else:
        try:
            value = loads_strict(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, RepeatedName
            why = "nested too deeply to parse" if isinstance(exc, RecursionError) else str(exc)
            raise UnlearnCliError(f"--config is neither a JSON object nor a file holding one: {why}") from None
    if not isinstance(value, dict):
        raise UnlearnCliError(f"--config must be a JSON object of hyper-parameters, got {json_type(value)}")
    return value


STORE_MANIFEST = "manifest.json"  # a version folder of the service's model store (model_store.local)


def read_checkpoint(directory: Path) -> tuple[dict, bytes, str]:
    """The checkpoint's ``config.json``, its weights' bytes and their sha256 (read once, so
    the hash kept in the lineage is that of the weights loaded), after checking the
    directory holds a checkpoint with a dataset spec (the cells are validated against
    that data).

    A version folder of the service's model store keeps the dataset spec, the recipe
    and the lineage's erased cells in its ``manifest.json`` instead; they are read from
    there (as ``dataset``, ``train`` and ``erased``) after checking the weights against its
    ``sha256``, which must be there (as the store's own load requires).
    The service's tombstones (cells erased outside this version's lineage, e.g. before
    a rollback) live in its database and are not seen here."""
    if not os.path.lexists(directory):
        raise UnlearnCliError(f"checkpoint {directory} does not exist")
    if not (directory / WEIGHTS_FILE).is_file() or not (directory / CONFIG_FILE).is_file():
        raise UnlearnCliError(f"{directory} is not a checkpoint: it needs {WEIGHTS_FILE} and {CONFIG_FILE}")
    manifest = _json(directory / CONFIG_FILE)
    try:
        weights = (directory / WEIGHTS_FILE).read_bytes()
    except OSError as exc:
        raise UnlearnCliError(f"cannot read {directory / WEIGHTS_FILE}: {exc.strerror or exc}") from None
    weights_sha256 = hashlib.sha256(weights).hexdigest()
    lineage_file = directory / CONFIG_FILE
    if "dataset" not in manifest and (directory / STORE_MANIFEST).is_file():
        lineage_file = directory / STORE_MANIFEST
        store = _json(directory / STORE_MANIFEST)
        recorded = store.get("sha256")
        # required, as the store's own load requires it (model_store.base.Manifest; not imported:
        # model_store depends on the engine, not the other way): a manifest without it, or with
        # an empty one, used to let any weights through
        if not is_sha256(recorded):
            raise UnlearnCliError(f"{directory / STORE_MANIFEST} has no valid 'sha256' of its weights (64 lowercase "
                                  f"hex digits), got {short_repr(recorded, 70)}: {directory / WEIGHTS_FILE} cannot be checked")
        if recorded != weights_sha256:
            raise UnlearnCliError(f"{directory / WEIGHTS_FILE} does not match the sha256 in its {STORE_MANIFEST}")
        # as written, not `or []`: a damaged value ({}, false, null) read as "nothing erased" would
        # train and unlearn on cells erased earlier in the lineage; _check_lineage refuses it
        manifest.update(dataset=store.get("dataset"), erased=store.get("erased_cells", []))
        if store.get("train_config"):
            manifest["train"] = store["train_config"]
    if not isinstance(manifest.get("dataset"), dict):
        raise UnlearnCliError(f"{directory / CONFIG_FILE} has no 'dataset' spec, so the training data it reflects is "
                              "unknown (checkpoints of `python -m unlearning.train` carry one)")
    _check_lineage(manifest, lineage_file)
    return manifest, weights, weights_sha256


def _check_lineage(manifest: dict, path: Path) -> None:
    """The checkpoint's ``erased`` (a list of ``[instance_id, task]`` pairs of strings) and
    ``lineage`` (a list), when present, as this command writes them; :class:`UnlearnCliError`
    naming ``path`` (where they were read) otherwise, rather than a new checkpoint built on
    a damaged history."""
    erased = manifest.get("erased", [])
    bad = [erased] if not isinstance(erased, list) else [
        c for c in erased if not (isinstance(c, (list, tuple)) and len(c) == 2 and all(isinstance(x, str) for x in c))]
    if bad:
        shown = repr(bad[0])
        raise UnlearnCliError(f"{path}: 'erased' must be a list of [instance_id, task] pairs of strings; "
                              f"found {shown[:200]}")
    if not isinstance(manifest.get("lineage", []), list):
        raise UnlearnCliError(f"{path}: 'lineage' must be a list of earlier jobs, got {json_type(manifest['lineage'])}")


def _json(path: Path) -> dict:
    value = read_json(path)  # CliError: missing, unreadable, not UTF-8, not JSON, nested too deeply
    if not isinstance(value, dict):
        raise UnlearnCliError(f"{path} is not a JSON object")
    return value


def unlearn_checkpoint(source: str | Path, out: str | Path, cells: list[tuple[str, str]] | None = None, *,
                       instances: list[str] | None = None, only_tasks: list[str] | None = None,
                       method: str = "interference_aware", config: dict | None = None, seed: int = 0,
                       device: str = "auto", calibrate: bool = False, progress: bool = True,
                       writes: Writes | None = None, reference_scenes: int = 0) -> dict:
    """Erase cells from the checkpoint ``source`` into the new checkpoint ``out``; returns
    the summary the CLI prints (``checkpoint``, ``erased`` and the job's ``metrics``).

    Cells are ``cells`` plus every instance of ``instances`` with each task of
    ``only_tasks`` (all tasks when None). ``calibrate``: interference_aware's τ from
    shadow models trained with the checkpoint's recipe (its ``train`` entry).
    ``retrain`` repeats the checkpoint's recipe. ``reference_scenes`` > 0 gives the method
    that many rendered held-out scenes beyond the test split
    (:func:`unlearning.data.load_reference`, synthetic datasets) in place of the test split,
    which stays the audit's data. :class:`UnlearnCliError` or
    :class:`unlearning.job.JobInputError` (both ValueErrors; the shared checks raise
    ``UnlearnCliError``'s base :class:`~unlearning.cli.CliError`) before any work for a
    request that cannot run, the output location included. ``writes`` records how far the
    write of ``out`` got (for the message of a Ctrl-C)."""
    from .data import load_reference, load_splits
    from .job import JobInputError, check_config, check_model_matches, run_unlearning_job, validate_forget_cells
    from .methods import METHOD_NAMES
    from .model import model_config_from, model_from_safetensors, save_model
    from .cli import cli_device

    source, out = Path(source), Path(out)
    cells = check_request(instances, only_tasks, cells)  # before the checkpoint is read or the data rendered
    manifest, weights, parent_sha256 = read_checkpoint(source)  # loaded below; its hash is kept in the lineage
    if method not in METHOD_NAMES:
        raise UnlearnCliError(f"unknown method {method!r}; methods: {', '.join(METHOD_NAMES)}")
    if out.resolve() == source.resolve():
        raise UnlearnCliError("--out is the source checkpoint: a job writes a new version and never replaces one")
    if source.resolve() in out.resolve().parents:  # the source would then hold more than a checkpoint
        raise UnlearnCliError(f"--out {out} is inside the source checkpoint {source}: give a path beside it")
    # before the job: what the write would refuse (a link, `.`, a parent that cannot be made) fails now
    if check_output_dir(out):
        raise UnlearnCliError(f"{out} already exists and is not an empty directory")
    if not isinstance(reference_scenes, int) or isinstance(reference_scenes, bool) or reference_scenes < 0:
        raise UnlearnCliError(f"--reference-scenes must be 0 or more, got {reference_scenes!r}")
    if reference_scenes and method != "interference_aware":  # the one method that reads held-out data
        raise UnlearnCliError(f"a held-out reference is interference_aware's; method {method!r} reads none")
    config = dict(config or {})
    if config.get("tau") and (calibrate or reference_scenes):
        # fixed levels: the method reads neither the held-out data nor a calibration (both were
        # accepted, computed or rendered, and recorded in the lineage as if they had been used)
        raise UnlearnCliError(f"{'--calibrate' if calibrate else '--reference-scenes'} sets the levels "
                              "interference_aware forgets toward; the --config gives fixed levels 'tau'")
    if calibrate and config.get("shadow_scores"):
        raise UnlearnCliError("--calibrate computes the shadow scores; the --config gives 'shadow_scores'")
    if calibrate:
        if method != "interference_aware":
            raise UnlearnCliError(f"calibration is interference_aware's; method {method!r} has none")
        if not isinstance(manifest.get("train"), dict):
            raise UnlearnCliError(f"{source / CONFIG_FILE} has no 'train' recipe to train shadow models with")
        config.setdefault("shadow_recipe", manifest["train"])
    if method == "retrain" and isinstance(manifest.get("train"), dict):
        config.setdefault("train", manifest["train"])  # the gold standard: the same recipe on the retained cells
    check_config(method, config)  # JobInputError before the data is rendered or read (the job checks again)

    dev = cli_device(device)  # CliError: not a device, or no CUDA
    problem = memory_shortfall(data_needs(manifest.get("dataset"), reference_scenes))
    if problem:  # before anything is rendered (a huge --reference-scenes got the process killed)
        raise UnlearnCliError(f"this job {problem}" + ("; give fewer --reference-scenes" if reference_scenes else ""))
    try:
        train, test = load_splits(manifest["dataset"])
        reference = load_reference(manifest["dataset"], reference_scenes) if reference_scenes else None
    except (KeyError, OSError, ValueError) as exc:  # unknown dataset or bad spec; no data files
        raise UnlearnCliError(exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)) from None
    erased = [tuple(c) for c in manifest.get("erased", [])]
    requested = forget_cells(train.tasks, list(instances or []), only_tasks, list(cells or []), erased)
    again = sorted(set(requested) & set(erased))
    if again:
        raise JobInputError(f"already erased in the lineage of {source}: {[list(c) for c in again]}")
    try:
        model = model_from_safetensors(model_config_from(manifest, source / CONFIG_FILE), weights,
                                       source / WEIGHTS_FILE, dev)
    except ValueError as exc:  # a missing, damaged or mismatched checkpoint (the message names the file)
        raise UnlearnCliError(f"{source}: {exc}") from None
    # the job checks these first too; here they are refused before the progress bar is drawn,
    # so a refusal is the one `error:` line on stderr (not a line behind a bar at 0%)
    retained = train.without(erased)
    validate_forget_cells(retained, requested, test)
    check_model_matches(model, retained, test)

    bar = tqdm(total=100, desc=f"unlearn ({method})", disable=not progress, leave=False, unit="%")

    def report(fraction: float) -> None:
        bar.update(max(0, round(100 * fraction) - bar.n))

    try:
        result = run_unlearning_job(model, retained, test, requested, method=method, config=config,
                                    device=dev, seed=seed, progress=report, reference=reference)
    finally:
        bar.close()

    # strict JSON, as the service records them: an infinite UIS (a perfect error lost) or a
    # NaN is null, in the summary printed and in the checkpoint's lineage
    metrics = finite_json({k: result.metrics[k] for k in METRIC_KEYS if k in result.metrics})
    lineage = list(manifest.get("lineage", []))
    lineage.append({
        "parent": str(source.resolve()),
        "parent_sha256": parent_sha256,
        "cells": [list(c) for c in requested],
        "method": method,
        "config": config,
        "seed": seed,
        **({"reference_scenes": reference_scenes} if reference_scenes else {}),
        "metrics": metrics,
    })
    extra = {k: v for k, v in manifest.items() if k not in ("model", "erased", "lineage")}
    extra.update(erased=[list(c) for c in sorted(set(erased) | set(requested))], lineage=lineage)

    write_dir_atomically(out, lambda staging: save_model(result.model, staging, extra=extra),  # out: empty or absent
                         writes=writes)
    return {"checkpoint": str(out), "erased": [list(c) for c in requested], "metrics": metrics}


def main(argv: list[str] | None = None, prog: str = "python -m unlearning.unlearn") -> int:
    """CLI: erase an instance (all tasks, or --tasks) or single cells from a checkpoint into a new one."""
    from .methods import METHOD_NAMES

    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                epilog="Errors (unknown instance, task or method, a cell erased earlier, an "
                                "existing --out) exit with status 2 and write nothing.")
    p.add_argument("--checkpoint", required=True, help="source checkpoint directory (model.safetensors + config.json)")
    p.add_argument("--out", required=True, help="new checkpoint directory (must not exist or be empty)")
    p.add_argument("--instance", action="append", default=[], metavar="ID",
                   help="a training instance to erase (repeatable): every task it still holds in the lineage, "
                        "unless --tasks")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="partial-task erasure: only these tasks of each --instance")
    p.add_argument("--cell", action="append", default=[], metavar="ID:TASK", help="one (instance, task) cell (repeatable)")
    p.add_argument("--method", default="interference_aware", help=f"one of {', '.join(METHOD_NAMES)} (default %(default)s)")
    p.add_argument("--config", help="the method's hyper-parameters: a JSON object or a file holding one "
                   "(default: the method's own defaults)")
    p.add_argument("--calibrate", action="store_true",
                   help="interference_aware: calibrate the target levels with shadow models trained with the "
                        "checkpoint's recipe (slow: (1 + tasks) x 4 trainings)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the method's sampling (default %(default)s; the evaluation's retained sample is the model version's: "
                        "drawn with seed 0 for every job, so the original model's numbers on it are computed once)")
    p.add_argument("--reference-scenes", type=int, default=0, metavar="N",
                   help="interference_aware reads N rendered held-out scenes beyond the test split (synthetic "
                        "datasets) instead of the test split, which stays the audit's non-members (default 0: "
                        "the test split for both)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda[:n] (default auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    from .job import JobInputError, UnlearningDiverged

    writes = Writes()
    try:
        check_seed(args.seed, "--seed", METHOD_SEEDS)  # it seeds the method's generators (x 1_000_003)
        summary = unlearn_checkpoint(args.checkpoint, args.out, [parse_cell(c) for c in args.cell],
                                     instances=args.instance,
                                     only_tasks=args.tasks, method=args.method, config=method_config(args.config),
                                     seed=args.seed, device=args.device, calibrate=args.calibrate,
                                     progress=not args.no_progress, writes=writes,
                                     reference_scenes=args.reference_scenes)
        print(json.dumps(summary, indent=2))
    except (CliError, JobInputError) as exc:  # UnlearnCliError is a CliError
        return report_cli_error(exc)
    except UnlearningDiverged as exc:  # the run failed; nothing was written
        report_cli_error(exc)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line saying what was written (nothing, before the write)
        return report_interrupted(writes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
