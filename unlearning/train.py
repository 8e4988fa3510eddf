"""Train a multi-task model on the supervised cells of a dataset.

The same recipe trains the deployed model and the gold standard (retrained
from scratch on the retained cells), so it is one plain loop: seeded
shuffling, AdamW, cosine learning rate, loss = sum over tasks of the mean loss
over supervised cells (those with a labelled pixel). There is no augmentation and no early stopping by
default: the original model should fit (memorise) its training data, which is
what makes membership inference, and hence forgetting, measurable.

    python -m unlearning.train --dataset indoor --n-train 160 --epochs 30 --out runs/indoor
    python -m unlearning.train --dataset cityscapes --root data/cityscapes --num-classes 19 --out runs/cs

The checkpoint directory is new (``--out`` must not exist or be empty; ``--force``
replaces a checkpoint there), written to a temporary sibling and renamed into place. A
request that cannot run (an unknown dataset, a missing ``--root``, a setting that would
not train, an output that cannot be made) is refused before any work: ``error: ...`` on
stderr, exit status 2, nothing written. So is a run that diverged (non-finite weights,
e.g. with a huge ``--lr``), after training. The metrics printed are strict JSON (null
for a value that is not finite).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .cli import (CliError, Writes, check_output_dir, check_seed, cli_device, report_cli_error, report_interrupted,
                  write_dir_atomically)
from .data import SYNTHETIC_DATASETS
from .data.synthetic import SIZE_DEFAULTS
from .data.base import MultiTaskDataset
from .losses import cell_losses, measured_cells, supervised_loss
from .jsonio import finite_json
from .model import ImageSizeError, ModelConfig, MultiTaskNet, check_image_size, non_finite_tensors, save_model


@dataclass
class TrainConfig:
    """The training recipe; stored in the checkpoint manifest so a retrain can repeat it."""

    # Memorisation needs passes over each instance, not steps: on indoor 48x64 this recipe
    # gave an original-model MIA AUC of 0.68 after 40 epochs (160 instances) and 0.98
    # after 100 epochs (64 instances).
    epochs: int = 80
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.0  # regularisation would blur the memorisation MIA relies on
    seed: int = 0
    width: int = 32
    depth: int = 3
    head_width: int = 32
    cosine: bool = True  # anneal the lr to 0 so the last epochs settle into a minimum
    grad_clip: float | None = 5.0  # the gradient norm's clip; None or 0: no clipping (as the methods' grad_clip)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None: CUDA when available, else CPU; ``"cpu"``; ``"cuda[:n]"`` (a
    RuntimeError when CUDA is not available, or has no device ``n``, rather than a
    silent fallback; and for any other kind of device: the library runs on these two)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError):  # torch's own list of every device type it knows of
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise RuntimeError(f"device {device!r} is not supported: use 'auto', 'cpu' or 'cuda[:n]'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RuntimeError(f"device {device!r} requested but this machine has {torch.cuda.device_count()} "
                           "CUDA device(s)")
    return dev


def build_model(dataset: MultiTaskDataset, cfg: TrainConfig) -> MultiTaskNet:
    """A fresh model for ``dataset``'s tasks with ``cfg``'s architecture, initialised from
    ``cfg.seed``; :class:`~unlearning.model.ImageSizeError` when it could not take one of
    ``dataset``'s images alone (:func:`~unlearning.model.check_image_size`)."""
    config = ModelConfig.for_dataset(dataset, width=cfg.width, depth=cfg.depth, head_width=cfg.head_width)
    check_image_size(config, *dataset.images.shape[-2:])
    torch.manual_seed(cfg.seed)
    return MultiTaskNet(config)


class TrainingDiverged(RuntimeError):
    """Training left weights that hold a NaN or an infinity (:func:`check_trained`): a model
    that :func:`~unlearning.model.load_model` and the model store's readers refuse."""


def check_trained(model: MultiTaskNet, probe: torch.Tensor | None = None) -> None:
    """:class:`TrainingDiverged` naming the tensors of ``model`` that hold a NaN or an
    infinity (a learning rate too large, say) or, with ``probe`` images (a few training
    images), the tasks whose predictions on them are not finite (weights can stay finite,
    huge, while the outputs overflow); nothing when all is finite. For a caller to run
    before it writes a trained model anywhere."""
    state = model.state_dict()
    bad = non_finite_tensors(state)
    if bad:
        raise TrainingDiverged(f"training diverged: non-finite weights (NaN or infinity) in {len(bad)} of "
                               f"{len(state)} tensors ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
    if probe is None or not len(probe):
        return
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            outputs = model(probe.to(device))
    finally:
        model.train(was_training)
    tasks = [t for t, out in outputs.items() if not bool(torch.isfinite(out).all())]
    if tasks:
        raise TrainingDiverged(f"training diverged: the model's {', '.join(tasks)} predictions on {len(probe)} "
                               "training images are not finite (its weights are)")


def training_steps(n: int, cfg: TrainConfig) -> int:
    """How many optimiser steps :func:`train_model` takes on ``n`` instances (the last
    batch of an epoch may be short)."""
    return cfg.epochs * math.ceil(n / cfg.batch_size)


def resident(dataset: MultiTaskDataset, device: torch.device) -> MultiTaskDataset:
    """``dataset`` on a CUDA ``device`` when it takes under a quarter of the free memory, else
    as it is. Gathering every batch on the CPU and copying it over took about 40% of a
    training step at the ``full`` suite's image size; the same batches, copied once."""
    if device.type != "cuda" or dataset.images.device == device:
        return dataset
    free, _ = torch.cuda.mem_get_info(device)
    return dataset.to(device) if dataset.nbytes < free // 4 else dataset


def train_model(
    dataset: MultiTaskDataset,
    cfg: TrainConfig,
    model: MultiTaskNet | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    on_progress: Callable[[float], None] | None = None,
) -> MultiTaskNet:
    """Train ``model`` in place (a fresh one from :func:`build_model` when None) on
    ``dataset``'s supervised cells and return it, in eval mode, on the training device.

    Only cells with ``available`` True and a labelled pixel contribute (an erased
    cell of a kept instance gives its task head no gradient; a cell without a valid
    pixel, an npy depth map of zeros say, does not count in its task's mean). Deterministic for a seed on
    CPU at a fixed number of threads: the initialisation uses
    ``torch.manual_seed(cfg.seed)`` and the shuffling its own generator, but the CPU
    kernels' reductions are split by ``torch.get_num_threads()`` (1 and 2 threads gave
    other weights from one seed), so the train CLI records it beside the recipe
    (``torch_threads``). ``on_progress`` is called with the fraction done in [0, 1]
    after every step.
    """
    if len(dataset) == 0:
        raise ValueError("cannot train on an empty dataset")
    device = resolve_device(device)
    if model is None:
        model = build_model(dataset, cfg)
    missing = [t for t in dataset.tasks if t not in model.tasks]
    if missing:
        raise ValueError(f"model has no head for tasks {missing}")
    model.to(device).train()
    source = resident(dataset, device)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = training_steps(len(dataset), cfg)
    schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1)) if cfg.cosine else None
    )
    generator = torch.Generator().manual_seed(cfg.seed)

    step = 0
    bar = tqdm(total=total, desc="train", disable=not progress, leave=False)
    try:
        for epoch in range(cfg.epochs):
            # on the data's device: indexing it with a host tensor would copy (and wait) every step
            order = torch.randperm(len(dataset), generator=generator).to(source.images.device)
            running, seen = torch.zeros((), device=device), 0  # summed on the device: no sync per step
            for start in range(0, len(dataset), cfg.batch_size):
                batch = source.batch(order[start : start + cfg.batch_size]).to(device)
                # over the cells with a labelled pixel (a supervised cell without one has no loss)
                loss = supervised_loss(cell_losses(model, batch, dataset.tasks), measured_cells(batch, dataset.tasks))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                if schedule is not None:
                    schedule.step()
                step += 1
                running += loss.detach() * len(batch.index)
                seen += len(batch.index)
                bar.update(1)
                if on_progress is not None:
                    on_progress(step / max(total, 1))
            bar.set_postfix(epoch=epoch + 1, loss=f"{float(running) / max(seen, 1):.4f}")
    finally:
        bar.close()  # (on a Ctrl-C too: its message is not written behind the bar)
    return model.eval()


# ----------------------------------------------------------------------------- CLI

RENDERED_DATASETS = SYNTHETIC_DATASETS  # the others are read from --root (see unlearning.data)
# (option, dataset spec key, argparse destination)
_RENDER_OPTIONS = (("--n-train", "n_train", "n_train"), ("--n-test", "n_test", "n_test"),
                   ("--height", "height", "height"), ("--width", "width", "width"),
                   ("--data-seed", "seed", "data_seed"))
# the same, for the datasets read from files (unlearning.data.npy_format's spec keys)
_FILE_OPTIONS = (("--num-classes", "num_classes", "num_classes"), ("--limit", "limit", "limit"))


def _dataset_spec(args: argparse.Namespace) -> dict:
    """The dataset spec of the command line, checked; only the keys given go into it, so the
    loader's defaults stay the loader's (the checkpoint records it with every default written
    out: :func:`~unlearning.data.canonical_spec`). A ``--root`` is made absolute."""
    from .data import DATASETS

    name = args.dataset
    if name not in DATASETS:
        raise CliError(f"unknown dataset {name!r}; datasets: {', '.join(DATASETS)}")
    spec = {"name": name}
    rendering = [(option, key, getattr(args, dest)) for option, key, dest in _RENDER_OPTIONS
                 if getattr(args, dest) is not None]
    reading = [(option, key, getattr(args, dest)) for option, key, dest in _FILE_OPTIONS
               if getattr(args, dest) is not None]
    if name in RENDERED_DATASETS:
        if args.root is not None:
            raise CliError(f"--root is for the datasets read from files (nyuv2, cityscapes); {name!r} is rendered")
        if reading:
            raise CliError(f"{', '.join(o for o, _, _ in reading)}: only for the datasets read from files "
                           f"(nyuv2, cityscapes); {name!r} is rendered")
        given = rendering
    else:
        if rendering:
            raise CliError(f"{', '.join(o for o, _, _ in rendering)}: only for the rendered datasets "
                           f"({', '.join(RENDERED_DATASETS)}); {name!r} is read from --root")
        if not args.root:
            raise CliError(f"--dataset {name} needs --root, the folder of its .npy files")
        if not Path(args.root).is_dir():
            raise CliError(f"--root {args.root} is not a directory" if Path(args.root).exists()
                           else f"--root {args.root} does not exist")
        # absolute: the checkpoint records it, and `unlearning.unlearn --checkpoint` (no --root)
        # read a relative root against its own working directory, i.e. other data
        spec["root"] = os.path.abspath(args.root)
        given = reading
    for option, key, value in given:
        # (the renderer takes any non-negative seed; a scene has at least 2 rows and columns: a
        # --height 1 was refused only after "rendering ... scenes of 1x64 pixels" was printed)
        least = 0 if key == "seed" else 2 if key in ("height", "width") else 1
        if value < least:
            raise CliError(f"{option} must be at least {least}, got {value}"
                           + (" (interference_aware unlearns with held-out data)" if key == "n_test" else ""))
        spec[key] = value
    return spec


def _check_recipe(cfg: TrainConfig) -> None:
    """:class:`CliError` for a recipe that would not train (or not train anything)."""
    for option, value in (("--epochs", cfg.epochs), ("--batch-size", cfg.batch_size), ("--model-width", cfg.width),
                          ("--model-depth", cfg.depth), ("--head-width", cfg.head_width)):
        if value < 1:
            raise CliError(f"{option} must be at least 1, got {value}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise CliError(f"--lr must be a positive number, got {cfg.lr}")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise CliError(f"--weight-decay must be 0 or a positive number, got {cfg.weight_decay}")
    # AdamW scales every weight by 1 - lr * weight_decay each step (the cosine schedule only
    # lowers lr): at 1 the weights are zeroed, above it flipped, and the run trains nothing
    if cfg.lr * cfg.weight_decay >= 1:
        raise CliError(f"--lr {cfg.lr:g} times --weight-decay {cfg.weight_decay:g} is {cfg.lr * cfg.weight_decay:g}; "
                       "AdamW multiplies the weights by 1 - lr * weight_decay every step, so the product must be "
                       "below 1 (it zeroes or flips them)")
    check_seed(cfg.seed, "--seed")  # torch.manual_seed's range


def _check_memory(spec: dict, cfg: TrainConfig, device: torch.device | None = None) -> None:
    """:class:`CliError` for data or a model that cannot fit this machine's memory, or on a
    GPU the GPU's (lower bounds: :mod:`unlearning.resources`), before anything is rendered
    or built."""
    from .resources import data_needs, model_lower_bound, training_shortfall

    problem = training_shortfall(data_needs(spec), model_lower_bound(spec, cfg.width, cfg.depth, cfg.head_width),
                                 device)
    if problem:
        raise CliError(f"this run {problem}; use smaller images (--height, --width), fewer scenes (--n-train, "
                       "--n-test) or a smaller model (--model-width, --model-depth, --head-width)")


def _check_out(out: Path, force: bool) -> None:
    """``--out`` must be absent, an empty directory or, with ``--force``, a checkpoint to
    replace (a directory holding nothing but its files), and what :func:`write_dir_atomically`
    can take (:func:`check_output_dir`: not a symbolic link, nor ``.``; creatable)."""
    from .model import CONFIG_FILE, WEIGHTS_FILE

    held = check_output_dir(out)
    if held and not force:
        raise CliError(f"--out {out} already exists and is not an empty directory "
                       "(--force replaces a checkpoint there)")
    if held and not set(held) <= {WEIGHTS_FILE, CONFIG_FILE}:
        raise CliError(f"--force replaces a checkpoint ({WEIGHTS_FILE}, {CONFIG_FILE}) only; "
                       f"{out} holds {held}")


def main(argv: list[str] | None = None, prog: str = "python -m unlearning.train") -> int:
    """CLI: train on a named dataset and write a checkpoint (safetensors + config.json)."""
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog=prog, description=main.__doc__,
                                epilog="Errors (an unknown dataset, a missing --root, a setting that would not "
                                "train, an existing --out) exit with status 2 and write nothing.")
    p.add_argument("--dataset", required=True, help="indoor | street | nyuv2 | cityscapes")
    p.add_argument("--root", help="data root (nyuv2, cityscapes)")
    sizes = SIZE_DEFAULTS  # the renderer's defaults, shown (the spec records only what was given)
    p.add_argument("--n-train", type=int, help=f"training scenes (synthetic datasets; default {sizes['n_train']})")
    p.add_argument("--n-test", type=int, help=f"test scenes (synthetic datasets; default {sizes['n_test']})")
    p.add_argument("--height", type=int, help=f"image height (synthetic datasets; default {sizes['height']})")
    p.add_argument("--width", type=int, help=f"image width (synthetic datasets; default {sizes['width']})")
    p.add_argument("--data-seed", type=int, help=f"seed of the synthetic renderer (default {sizes['seed']})")
    p.add_argument("--num-classes", type=int, help="segmentation classes (nyuv2, cityscapes; default 13 and 7: "
                   "19 for the standard Cityscapes labels)")
    p.add_argument("--limit", type=int, help="read only the first N samples of each split (nyuv2, cityscapes)")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the data (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size,
                   help="images per optimizer step (default %(default)s)")
    p.add_argument("--lr", type=float, default=defaults.lr, help="AdamW's learning rate, cosine-annealed to 0 "
                   "(default %(default)g)")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay, 
                   help="AdamW's decoupled weight decay (default %(default)g)")
    p.add_argument("--seed", type=int, default=defaults.seed, 
                   help="initialisation and batch order (default %(default)s)")
    p.add_argument("--model-width", type=int, default=defaults.width, help="channels of the encoder's first stage, "
                   "doubled at each further one (default %(default)s)")
    p.add_argument("--model-depth", type=int, default=defaults.depth, help="encoder stages (default %(default)s)")
    p.add_argument("--head-width", type=int, default=defaults.head_width, help="channels of each task head "
                   "(default %(default)s)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda[:n] (default auto)")
    p.add_argument("--out", required=True, help="checkpoint directory (must not exist or be empty, unless --force)")
    p.add_argument("--force", action="store_true", help="replace the checkpoint at --out (a directory holding "
                   "only model.safetensors and config.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    writes = Writes()
    try:
        return _train_cli(args, writes)
    except CliError as exc:
        return report_cli_error(exc)
    except KeyboardInterrupt:  # Ctrl-C: one line saying what was written (nothing, before the write)
        return report_interrupted(writes)


def _load_data(spec: dict, progress: bool) -> tuple[MultiTaskDataset, MultiTaskDataset]:
    """``load_splits(spec)``, the scenes of a synthetic dataset rendered by as many processes
    as their size calls for (``"auto"``: the tensors are the same for any number); with
    ``progress``, a line on stderr before and after (rendering 400 scenes of 96x128 took
    over two minutes with no output; the renderer reports nothing per scene)."""
    import time

    from . import data

    if progress:
        full = data.canonical_spec(spec)
        what = (f"rendering {full['n_train']} training and {full['n_test']} test {full['name']} scenes of "
                f"{full['height']}x{full['width']} pixels" if spec["name"] in RENDERED_DATASETS
                else f"reading {full['name']} from {full['root']}")
        print(f"{what} ...", file=sys.stderr, flush=True)
    start = time.monotonic()
    train, test = data.load_splits(spec, render_workers="auto")
    if progress:
        print(f"loaded {len(train)} training and {len(test)} test instances in {time.monotonic() - start:.1f} s",
              file=sys.stderr, flush=True)
    return train, test


def _train_cli(args: argparse.Namespace, writes: Writes | None = None) -> int:
    """:func:`main` after parsing: everything is checked before the data is loaded, the
    checkpoint is written to a temporary sibling of ``--out`` and renamed into place."""
    from .data import canonical_spec
    from .evaluate import task_metrics
    from .model import WEIGHTS_FILE

    spec = _dataset_spec(args)
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        width=args.model_width,
        depth=args.model_depth,
        head_width=args.head_width,
    )
    _check_recipe(cfg)
    device = cli_device(args.device)
    out = Path(args.out)
    _check_out(out, args.force)
    _check_memory(spec, cfg, device)
    try:
        train, test = _load_data(spec, progress=not args.no_progress)
    except (KeyError, OSError, ValueError) as exc:  # a bad spec, missing or unreadable data files
        raise CliError(exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)) from None
    for split, dataset in (("training", train), ("test", test)):
        if len(dataset) == 0:
            raise CliError(f"the {split} split of {spec['name']!r} is empty"
                           + (" (interference_aware unlearns with held-out data)" if split == "test" else ""))
    try:
        model = train_model(train, cfg, device=device, progress=not args.no_progress)
    except ImageSizeError as exc:  # build_model's, before any step
        raise CliError(str(exc)) from None
    try:
        # such weights were written, and every later load refused them
        check_trained(model, train.images[: cfg.batch_size])
    except TrainingDiverged as exc:
        decay = f" or --weight-decay (got {cfg.weight_decay:g})" if cfg.weight_decay else ""
        raise CliError(f"{exc}; nothing was written: try a smaller --lr (got {cfg.lr:g}){decay}") from None
    # every default written out: the checkpoint names the same data should the loaders'
    # defaults (SIZE_DEFAULTS, an npy dataset's num_classes) change; dataset_key is the same.
    # The thread count beside the recipe: one seed gives one model at one count only (train_model).
    extra = {"dataset": canonical_spec(spec), "train": asdict(cfg), "torch_threads": torch.get_num_threads()}
    try:
        write_dir_atomically(out, lambda staging: save_model(model, staging, extra=extra),
                             replace=args.force, writes=writes)
    except OSError as exc:
        raise CliError(f"cannot write the checkpoint {out}: {exc}") from None
    summary = {
        "checkpoint": str(out / WEIGHTS_FILE),
        "train": task_metrics(model, train),
        "test": task_metrics(model, test),
    }
    # strict JSON: a metric that is not finite (finite weights, overflowing predictions) is null
    print(json.dumps(finite_json(summary), indent=2, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
