"""The engine on CUDA: the device paths CPU-only CI cannot run.

Skipped without a GPU. On a machine with one, ``python -m pytest tests/gpu`` trains a tiny
model on rendered scenes on the device, runs every method through the job the worker
calls, the ``unlearn`` CLI and a tiny benchmark there, and checks that the results stay on
the device, are finite and keep the promises the CPU tests check (the caller's model
untouched; protected heads bit-identical in a partial request).
"""
from __future__ import annotations

import copy
import importlib
import json
import math
import os

import pytest
import torch

from unlearning import bench
from unlearning.data import load_splits
from unlearning.job import run_unlearning_job
from unlearning.losses import per_sample_losses
from unlearning.methods import METHOD_NAMES
from unlearning.train import TrainConfig, build_model, train_model

# UNLEARND_REQUIRE_GPU=1 (a run on a GPU machine): a missing CUDA device fails every test
# instead of skipping it, so a broken driver or a CPU-only torch cannot pass as green
REQUIRE_GPU = os.environ.get("UNLEARND_REQUIRE_GPU") == "1"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not REQUIRE_GPU,
                                reason="needs a CUDA device (UNLEARND_REQUIRE_GPU=1 makes this a failure)")


@pytest.fixture(scope="module", autouse=True)
def _cuda_device_required():  # module scope: before the module fixtures that train on the device
    if not torch.cuda.is_available():
        pytest.fail("UNLEARND_REQUIRE_GPU=1 but torch sees no CUDA device")

SPEC = {"name": "indoor", "n_train": 16, "n_test": 8, "height": 16, "width": 24, "seed": 0}
RECIPE = dict(epochs=6, batch_size=8, lr=4e-3, width=8, depth=2, head_width=8, seed=0)
# a few steps each: the point is the device, not the quality
FAST = {"interference_aware": {"steps": 6}, "retrain": {"train": dict(RECIPE, epochs=2)}, "finetune": {"steps": 4},
        "gradient_ascent": {"steps": 2}, "neggrad_plus": {"steps": 3}, "random_target": {"steps": 3},
        "scrub": {"rounds": 2, "max_rounds": 2}, "salun": {"steps": 3}, "ssd": {"fisher_samples": 8},
        "l1_sparse": {"steps": 3}, "pcgrad": {"steps": 3}}


@pytest.fixture(scope="module")
def world():
    train, test = load_splits(SPEC)
    model = train_model(train, TrainConfig(**RECIPE), device="cuda", progress=False)
    return train, test, model


def mean_loss(model, data) -> float:
    return sum(float(v.nanmean()) for v in per_sample_losses(model, data, device="cuda").values())


def test_training_on_cuda_fits_the_data(world):
    train, _, model = world
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert train.images.device.type == "cpu"  # train_model trains on a copy on the GPU, not the caller's data
    torch.manual_seed(0)
    untrained = build_model(train, TrainConfig(**RECIPE)).to("cuda")
    assert mean_loss(model, train) < mean_loss(untrained, train)


def test_every_method_runs_as_a_job_on_cuda(world):
    assert sorted(FAST) == sorted(METHOD_NAMES)
    train, test, model = world
    before = copy.deepcopy(model.state_dict())
    full = [("indoor-00003", t) for t in train.tasks]
    partial = [("indoor-00005", "depth"), ("indoor-00009", "depth")]
    for method in METHOD_NAMES:
        for cells in (full, partial):
            result = run_unlearning_job(model, train, test, cells, method=method, config=FAST[method], device="cuda")
            assert all(p.device.type == "cuda" for p in result.model.parameters()), method
            for key in ("uis", "mia_auc", "mia_auc_original"):
                assert math.isfinite(result.metrics[key]), (method, key)
            if cells is partial and importlib.import_module(f"unlearning.methods.{method}").PROTECTS_HEADS:
                after = result.model.state_dict()
                kept = [n for n in after if n.startswith(("heads.segmentation.", "heads.normal."))]
                assert kept and all(torch.equal(after[n], before[n]) for n in kept), method
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the caller's model untouched


def test_a_job_keeps_the_data_on_the_gpu_for_the_next(world):
    from unlearning.job import on_device
    from unlearning.methods import UnlearnData

    train, test, model = world
    cache: dict = {}
    cells = [("indoor-00005", "depth"), ("indoor-00009", "depth")]
    result = run_unlearning_job(model, train, test, cells, config=FAST["interference_aware"], device="cuda", cache=cache)
    assert math.isfinite(result.metrics["mia_auc"])
    source, placed = cache[("resident", "train")]
    assert source is train and placed.images.device.type == "cuda" and train.images.device.type == "cpu"
    assert cache[("resident", "test")][1].images.device.type == "cuda"
    # the next job on the version (its data loaded again: another object, the same cells) reuses the copy
    again = train.without([])
    assert on_device(cache, "train", again, torch.device("cuda")) is placed
    run_unlearning_job(model, again, test, [("indoor-00003", "segmentation")], config=FAST["interference_aware"],
                       device="cuda", cache=cache)
    assert cache[("resident", "train")][1] is placed
    # a released version (the worker releases every version but the newest) copies again when it runs a job
    from unlearning.job import release_device_data
    assert release_device_data(cache) == 2 and cache["eval_context"].train.images.device.type == "cpu"
    run_unlearning_job(model, again, test, [("indoor-00003", "segmentation")], config=FAST["interference_aware"],
                       device="cuda", cache=cache)
    assert cache[("resident", "train")][1].images.device.type == "cuda"
    assert cache["eval_context"].train is cache[("resident", "train")][1]
    # the forget batch gathered on the GPU is the one gathered on the host and copied over
    on_gpu = UnlearnData(placed, cells, placed.without(cells)).forget_batch()
    on_host = UnlearnData(train, cells, train.without(cells)).forget_batch().to("cuda")
    assert all(torch.equal(on_gpu.has[t], on_host.has[t]) for t in train.tasks)
    assert torch.equal(on_gpu.images, on_host.images)
    # without it the job still runs, on batches copied from the host
    bare: dict = {}
    run_unlearning_job(model, train, test, cells, config=FAST["interference_aware"], device="cuda", cache=bare,
                       keep_data_on_device=False)
    assert ("resident", "train") not in bare


def test_orthogonalization_on_cuda_is_batched_and_equals_the_per_tensor_one(world):
    from unlearning.methods.interference_aware import _orthogonalize, orthogonalize_all

    train, test, model = world
    result = run_unlearning_job(model, train, test, [("indoor-00004", t) for t in train.tasks],
                                config=FAST["interference_aware"], device="cuda")
    assert result.log["orthogonalize_impl"] == "batched"  # "auto" on CUDA
    gen = torch.Generator().manual_seed(0)
    shapes = [(32, 16, 3, 3), (32,), (8, 32, 1, 1)]
    g = [torch.randn(s, generator=gen) for s in shapes]
    refs = [[torch.randn(s, generator=gen) - 0.3 * x for s, x in zip(shapes, g)] for _ in range(3)]
    out, count = orthogonalize_all([x.cuda() for x in g], [[x.cuda() for x in r] for r in refs])
    want = [_orthogonalize(x, [r[j] for r in refs]) for j, x in enumerate(g)]
    assert int(count) == sum(n for _, n in want) > 0
    assert all(torch.allclose(o.cpu(), w, atol=1e-4, rtol=1e-3) for o, (w, _) in zip(out, want))


def test_unlearn_cli_on_cuda(tmp_path, capsys):
    from unlearning.train import main as train_main
    from unlearning.unlearn import main as unlearn_main

    args = ["--dataset", "indoor", "--n-train", "12", "--n-test", "8", "--height", "16", "--width", "24",
            "--epochs", "3", "--model-width", "8", "--model-depth", "2", "--head-width", "8"]
    assert train_main(args + ["--out", str(tmp_path / "v1"), "--no-progress", "--device", "cuda"]) == 0
    capsys.readouterr()
    assert unlearn_main(["--checkpoint", str(tmp_path / "v1"), "--instance", "indoor-00002", "--config",
                         '{"steps": 6}', "--out", str(tmp_path / "v2"), "--no-progress", "--device", "cuda"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["mode"] == "full"


def test_a_tiny_benchmark_on_cuda(tmp_path, monkeypatch):
    suite = {"benchmarks": {"indoor": dict(SPEC, n_train=14)}, "train": dict(RECIPE, epochs=2), "seeds": [0],
             "n_forget_full": [1], "n_forget_partial": 2, "retained_sample_size": 8, "threads": 1, "device": "cuda"}
    monkeypatch.setitem(bench.SUITES, "tiny-cuda", suite)
    config = tmp_path / "methods.json"
    config.write_text(json.dumps({"interference_aware": {"steps": 4}}))
    out = tmp_path / "results.json"
    assert bench.main(["--suite", "tiny-cuda", "--out", str(out), "--methods", "interference_aware", "retrain",
                       "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--no-shadow",
                       "--method-config", str(config)]) == 0
    doc = json.loads(out.read_text())
    assert doc["device"].startswith("cuda")
    assert {r["method"] for r in doc["results"]} >= {"interference_aware", "retrain"}
    assert all(math.isfinite(r["uis"]) and math.isfinite(r["mia_auc"]) for r in doc["results"])


def test_a_cpu_model_given_a_cuda_job_stays_on_the_cpu(world):
    """The job runs on a copy on the device: the caller's model is not moved (Module.to is in place)."""
    train, test, model = world
    on_cpu = copy.deepcopy(model).cpu()
    before = copy.deepcopy(on_cpu.state_dict())
    result = run_unlearning_job(on_cpu, train, test, [("indoor-00006", "depth")],
                                config=FAST["interference_aware"], device="cuda")
    assert all(p.device.type == "cuda" for p in result.model.parameters())
    assert all(p.device.type == "cpu" for p in on_cpu.parameters())
    assert all(torch.equal(v, before[k]) for k, v in on_cpu.state_dict().items())
