"""What one device does at a suite's scale, before committing device time to the suite.

Renders a benchmark of the suite (timed), then times the training recipe's steps
(after a warm-up; batches gathered on the host and copied over, as ``train_model``
did before it kept the data on the GPU) and the model's forward passes at the
suite's image size, and writes JSON. From the seconds per training step it says how long one training
(the original, every gold standard) takes on this device, i.e. which pieces of
the suite fit a time-limited device.

    python benchmarks/gpu_probe.py --suite full --benchmark indoor --steps 40 --out probe.json

``--batch-sizes 8 16 32`` also times the steps of each batch size with the data kept on
the device (as ``train_model`` does now) and, on CUDA, with bf16 autocast (also in
channels-last memory order with cuDNN's benchmarked kernels), and gives the
training's seconds at the recipe's epochs for each: what a recipe of larger batches (fewer
steps) would cost, before anyone checks that it still memorises. ``--height``/``--width``
render the benchmark at another size. The JSON is written after every measurement
(``"complete": false`` until the last), so a probe cut off keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from unlearning import bench
from unlearning.data import load_splits
from unlearning.losses import cell_losses, per_sample_losses, supervised_loss
from unlearning.train import build_model, training_steps


def write_json(path, doc: dict) -> None:
    """Write ``doc`` to ``path`` aside and rename it into place: a process killed mid-write
    (a time limit) leaves the last whole document, never a truncated one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(train, recipe, device, steps: int, autocast: bool = False, resident: bool = False,
               channels_last: bool = False) -> float:
    """Seconds per training step of ``recipe`` (batch of ``recipe.batch_size``), after 5 warm-up
    steps; batches gathered on the host and copied over, or with ``resident`` from the data
    kept on the device (indexed there, as ``train_model`` does). ``channels_last``: the model
    and the images in NHWC memory order, with cuDNN picking its kernels by benchmark (what
    convolutions at large image sizes often run fastest with; ``train_model`` does neither)."""
    model = build_model(train, recipe).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr)
    gen = torch.Generator().manual_seed(0)
    source = train.to(device) if resident else train
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = channels_last

    def step():
        idx = torch.randint(len(train), (recipe.batch_size,), generator=gen)
        batch = source.batch(idx.to(source.images.device)).to(device)
        if channels_last:
            batch.images = batch.images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = supervised_loss(cell_losses(model, batch, train.tasks), batch.has)
        opt.zero_grad(set_to_none=True)
        loss.float().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()

    try:
        for _ in range(5):
            step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
    finally:
        torch.backends.cudnn.benchmark = benchmark
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="full", choices=sorted(bench.SUITES))
    p.add_argument("--benchmark", default="indoor")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[], help="also time these, the data on the device")
    p.add_argument("--height", type=int, default=None, help="render at this height (default: the suite's)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    suite = bench.SUITES[args.suite]
    device, recipe = bench.suite_runtime(suite, args.device)
    spec = dict(suite["benchmarks"][args.benchmark])
    spec.update({k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None})
    out = {
        **bench.provenance(device),
        "suite": args.suite,
        "benchmark": spec,
        "recipe": asdict(recipe),
        "complete": False,
        "peak_memory_gib": None,
    }

    def write() -> None:  # after every measurement: a probe cut off (a time-limited device) keeps what it measured
        if device.type == "cuda":
            out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        write_json(args.out, out)

    write()
    t0 = time.perf_counter()
    train, test = load_splits(spec, render_workers="auto")
    out["render_seconds"] = round(time.perf_counter() - t0, 2)
    steps_per_training = training_steps(len(train), recipe)
    out["steps_per_training"] = steps_per_training
    write()

    step_fp32 = time_steps(train, recipe, device, args.steps)
    out["train_step_seconds"] = round(step_fp32, 5)
    out["training_seconds_estimate"] = round(step_fp32 * steps_per_training, 1)
    write()
    step_bf16 = time_steps(train, recipe, device, args.steps, autocast=True) if device.type == "cuda" else None
    out["train_step_seconds_bf16_autocast"] = None if step_bf16 is None else round(step_bf16, 5)
    model = build_model(train, recipe).to(device).eval()
    per_sample_losses(model, test, range(min(64, len(test))), device=device)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    per_sample_losses(model, test, device=device)
    _sync(device)
    out["forward_seconds_per_sample"] = round((time.perf_counter() - t0) / len(test), 6)
    write()

    by_batch = out["by_batch_size"] = {}
    for b in args.batch_sizes:
        r = replace(recipe, batch_size=b)
        row = {"steps_per_training": training_steps(len(train), r),
               "step_seconds_resident": time_steps(train, r, device, args.steps, resident=True)}
        row["training_seconds_estimate"] = round(row["step_seconds_resident"] * row["steps_per_training"], 1)
        by_batch[b] = {k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}
        write()
        if device.type == "cuda":
            for key, kw in (("step_seconds_resident_bf16_autocast", {}),
                            ("step_seconds_resident_bf16_channels_last", {"channels_last": True})):
                by_batch[b][key] = round(time_steps(train, r, device, args.steps, autocast=True, resident=True, **kw), 5)
                write()
    out["complete"] = True
    write()
    print(json.dumps(out, indent=2))
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
