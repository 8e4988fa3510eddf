"""User errors of the command-line entry points (``unlearnd train``, ``unlearnd bench``,
``unlearnd unlearn``): one line ``error: <what is wrong>`` on stderr, exit status 2, no
traceback, nothing written (and, where the work is long, nothing run first)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from app.cli import main as unlearnd
from unlearning import bench
from unlearning.train import main as train_main
from unlearning.unlearn import main as unlearn_main

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TINY = ["--n-train", "8", "--n-test", "4", "--height", "16", "--width", "16", "--epochs", "1",
        "--model-width", "4", "--model-depth", "1", "--head-width", "4"]
FAST = '{"steps": 2, "tau_refresh": 0}'
NO_PROC = not Path("/proc/self").is_dir()


def listing(root: Path) -> list[str]:
    """Every path under ``root`` (hidden ones included: a staging folder left behind shows)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def refused(capsys, rc: int, message: str) -> str:
    """Assert a refused request: status 2, one ``error:`` line naming ``message``, no traceback."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return err


def train(args: list[str]) -> int:
    return train_main(args + ["--no-progress"])


def ctrl_c(main, argv: list[str]) -> int:
    """``main(argv)`` where a Ctrl-C (a KeyboardInterrupt) is raised inside: it must return
    (130), not let the interrupt out (a traceback, and here the end of the test session)."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped main(): a traceback for a Ctrl-C")


def raise_interrupt(*args, **kwargs):
    raise KeyboardInterrupt


# ----------------------------------------------------------------------------- unlearnd train


@pytest.mark.parametrize("args, message", [
    (["--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--dataset", "nyuv2"], "--dataset nyuv2 needs --root"),
    (["--dataset", "nyuv2", "--root", "/nonexistent/nyuv2"], "--root /nonexistent/nyuv2 does not exist"),
    (["--dataset", "cityscapes", "--root", "/tmp", "--n-train", "3"], "--n-train: only for the rendered datasets"),
    (["--dataset", "indoor", "--root", "/tmp"], "--root is for the datasets read from files"),
    (["--dataset", "indoor", *TINY, "--num-classes", "19", "--limit", "2"],
     "--num-classes, --limit: only for the datasets read from files (nyuv2, cityscapes); 'indoor' is rendered"),
    (["--dataset", "cityscapes", "--root", "/tmp", "--num-classes", "0"], "--num-classes must be at least 1, got 0"),
    (["--dataset", "cityscapes", "--root", "/tmp", "--limit", "-3"], "--limit must be at least 1, got -3"),
    (["--dataset", "indoor", *TINY, "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--dataset", "indoor", *TINY, "--model-width", "0"], "--model-width must be at least 1, got 0"),
    (["--dataset", "indoor", *TINY, "--model-depth", "0"], "--model-depth must be at least 1, got 0"),
    (["--dataset", "indoor", *TINY, "--head-width", "-2"], "--head-width must be at least 1, got -2"),
    (["--dataset", "indoor", *TINY, "--lr", "-1"], "--lr must be a positive number, got -1.0"),
    (["--dataset", "indoor", *TINY, "--lr", "nan"], "--lr must be a positive number, got nan"),
    (["--dataset", "indoor", *TINY, "--weight-decay", "-0.1"], "--weight-decay must be 0 or a positive number"),
    # AdamW's decoupled decay: every step the weights times 1 - lr * weight_decay (here 0, then -1)
    (["--dataset", "indoor", *TINY, "--lr", "0.002", "--weight-decay", "500"],
     "--lr 0.002 times --weight-decay 500 is 1; AdamW multiplies the weights by 1 - lr * weight_decay"),
    (["--dataset", "indoor", *TINY, "--lr", "0.5", "--weight-decay", "4"], "--lr 0.5 times --weight-decay 4 is 2;"),
    (["--dataset", "indoor", *TINY, "--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--dataset", "indoor", *TINY, "--epochs", "-1"], "--epochs must be at least 1, got -1"),
    (["--dataset", "indoor", *TINY, "--n-train", "0"], "--n-train must be at least 1, got 0"),
    (["--dataset", "indoor", *TINY, "--n-test", "0"], "--n-test must be at least 1, got 0 (interference_aware"),
    (["--dataset", "indoor", *TINY, "--height", "0"], "--height must be at least 2, got 0"),
    (["--dataset", "indoor", *TINY, "--width", "1"], "--width must be at least 2, got 1"),  # refused after rendering
    (["--dataset", "indoor", *TINY, "--device", "tpu"], "--device 'tpu' is not a device"),
    # torch.manual_seed takes -2**63 .. 2**64 - 1; other seeds overflowed after the data was loaded
    (["--dataset", "indoor", *TINY, "--seed", str(2**70)], f"--seed {2**70} is out of range: a seed is an integer "
                                                            f"from {-2**63} to {2**64 - 1}"),
    (["--dataset", "indoor", *TINY, "--seed", str(-2**63 - 1)], f"--seed {-2**63 - 1} is out of range"),
    pytest.param(["--dataset", "indoor", *TINY, "--device", "cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
], ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_train_refuses_bad_arguments_before_any_work(tmp_path, capsys, monkeypatch, args, message):
    import unlearning.data

    monkeypatch.setattr(unlearning.data, "load_splits", lambda *a, **k: pytest.fail("loaded data for a bad request"))
    refused(capsys, train(args + ["--out", str(tmp_path / "out")]), message)
    assert listing(tmp_path) == []


def test_train_refuses_images_a_model_cannot_take_one_at_a_time_before_training(tmp_path, capsys, monkeypatch):
    """It trained on batches, wrote the checkpoint, then crashed with torch's GroupNorm error
    evaluating its one test image (exit 1, a traceback)."""
    import unlearning.train

    monkeypatch.setattr(unlearning.train, "save_model", lambda *a, **k: pytest.fail("wrote a checkpoint"))
    refused(capsys, train(["--dataset", "indoor", "--n-train", "2", "--n-test", "1", "--height", "4", "--width", "4",
                           "--head-width", "8", "--out", str(tmp_path / "out")]),
            "4x4 images shrink to 1x1 at the model's heads' first block")
    assert listing(tmp_path) == []


def test_train_help_shows_every_default(capsys):
    """`train --help` names the recipe's and the renderer's defaults (it showed none): the values
    a run without the option gets."""
    from unlearning.data.synthetic import SIZE_DEFAULTS
    from unlearning.train import TrainConfig

    with pytest.raises(SystemExit) as done:
        train_main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    cfg = TrainConfig()
    for option, value in [("--epochs", cfg.epochs), ("--batch-size", cfg.batch_size), ("--lr", f"{cfg.lr:g}"),
                          ("--weight-decay", f"{cfg.weight_decay:g}"), ("--seed", cfg.seed),
                          ("--model-width", cfg.width), ("--model-depth", cfg.depth),
                          ("--head-width", cfg.head_width), ("--n-train", SIZE_DEFAULTS["n_train"]),
                          ("--n-test", SIZE_DEFAULTS["n_test"]), ("--height", SIZE_DEFAULTS["height"]),
                          ("--width", SIZE_DEFAULTS["width"]), ("--data-seed", SIZE_DEFAULTS["seed"])]:
        described = text.split(f" {option} ", 1)[1]
        described = described[:described.index(" --")]
        assert f"default {value})" in described, (option, described)


def test_check_image_size_agrees_with_torch():
    from unlearning.model import ModelConfig, MultiTaskNet, check_image_size

    for h, w, width, head, depth in [(4, 4, 32, 8, 3), (4, 4, 32, 16, 3), (2, 2, 4, 16, 1), (2, 3, 4, 16, 2),
                                     (8, 8, 1, 16, 4), (3, 3, 16, 4, 2), (16, 16, 8, 8, 3), (5, 2, 8, 16, 4)]:
        cfg = ModelConfig(tasks={"depth": 1}, width=width, depth=depth, head_width=head)
        try:
            check_image_size(cfg, h, w)
            refused = None
        except ValueError as exc:
            refused = exc
        try:
            with torch.no_grad():
                MultiTaskNet(cfg).eval()(torch.rand(1, 3, h, w))
            failed = False
        except ValueError as exc:
            failed = "Expected more than 1 value per channel" in str(exc)
        assert (refused is not None) == failed, (h, w, width, head, depth, refused)


def test_train_names_a_data_file_it_cannot_read(tmp_path, capsys):
    root = tmp_path / "nyuv2"
    for split in ("train", "val"):
        for folder in ("image", "label", "depth", "normal"):
            (root / split / folder).mkdir(parents=True)
            (root / split / folder / "0.npy").write_bytes(b"not a numpy file")
    refused(capsys, train(["--dataset", "nyuv2", "--root", str(root), "--out", str(tmp_path / "out")]), "0.npy")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("out, message", [
    pytest.param("/proc/forbidden/x", "nothing can be written in /proc",
                 marks=pytest.mark.skipif(NO_PROC, reason="no /proc")),
    ("{file}/x", "is not a directory"),
    ("{file}", "exists and is not a directory"),
    # too long for the file system, as a folder to make or as the staging folder beside it
    # (".<name>.<12 hex>.tmp"): refused after training until 2026-12-07
    ("{dir}/" + "n" * 256 + "/x", "the name '" + "n" * 256 + "' is 256 bytes, longer than the 255"),
    ("{dir}/" + "n" * 238, "the name '." + "n" * 238 + ".000000000000.tmp' (written next to"),
])
def test_train_refuses_an_output_it_cannot_create_before_training(tmp_path, capsys, monkeypatch, out, message):
    import unlearning.train

    afile = tmp_path / "a-file"
    afile.write_text("keep me")
    monkeypatch.setattr(unlearning.train, "train_model", lambda *a, **k: pytest.fail("trained for a bad --out"))
    refused(capsys, train(["--dataset", "indoor", *TINY, "--device", "cpu",
                           "--out", out.format(file=afile, dir=tmp_path)]), message)
    assert listing(tmp_path) == ["a-file"] and afile.read_text() == "keep me"


@pytest.mark.parametrize("options, says", [
    (["--height", "100000", "--width", "100000"], "the 12 rendered scenes of 100000x100000 pixels: 3.9 TiB"),
    (["--n-train", "100000000"], "the 100000004 rendered scenes of 16x16 pixels"),
    (["--model-depth", "40"], "the model's weights, gradients and AdamW moments ("),
    (["--model-depth", "1000000000"], "the model's weights, gradients and AdamW moments ("),  # counted at once
    (["--model-width", "1000000"], "the model's weights, gradients and AdamW moments ("),
])
def test_train_refuses_sizes_no_memory_here_holds_before_rendering(tmp_path, capsys, monkeypatch, options, says):
    import unlearning.data

    # these used to get the process killed for memory, or a traceback from torch
    monkeypatch.setattr(unlearning.data, "load_splits", lambda *a, **k: pytest.fail("rendered the data"))
    err = refused(capsys, train(["--dataset", "indoor", *TINY, *options, "--device", "cpu",
                                 "--out", str(tmp_path / "out")]), "this run needs at least")
    assert says in err and "this machine has" in err
    assert listing(tmp_path) == []


def test_training_on_a_gpu_counts_the_optimizer_state_against_the_gpus_memory(tmp_path, capsys, monkeypatch):
    import unlearning.data
    import unlearning.resources as resources
    import unlearning.train

    # width 64, depth 8: 1.2e9 parameters, 4.5 GiB of weights on the host, 18.0 GiB of training
    # state on the GPU. Counted on the host, it was refused on a host of 8 GiB beside a GPU of 80
    monkeypatch.setattr(unlearning.train, "cli_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(resources, "machine_memory", lambda: 8 << 30)

    def rendered(*a, **k):
        raise RuntimeError("past the memory check")

    monkeypatch.setattr(unlearning.data, "load_splits", rendered)
    argv = ["--dataset", "indoor", *TINY, "--model-width", "64", "--model-depth", "8", "--device", "cuda",
            "--out", str(tmp_path / "out")]
    monkeypatch.setattr(resources, "device_memory", lambda device: 80 << 30)
    with pytest.raises(RuntimeError, match="past the memory check"):
        train(argv)
    monkeypatch.setattr(resources, "device_memory", lambda device: 16 << 30)
    err = refused(capsys, train(argv), "this run needs at least 18.0 GiB of memory (the model's weights, gradients")
    assert "more than the 16.0 GiB cuda has" in err
    monkeypatch.setattr(resources, "machine_memory", lambda: 4 << 30)  # the weights alone are built on the host
    err = refused(capsys, train(argv), "the model's weights, built on the host (1,208,874,927 parameters)")
    assert "this machine has" in err


def test_the_longest_output_name_the_staging_folder_leaves_room_for_is_taken(tmp_path):
    from unlearning.cli import CliError, check_output_dir, write_dir_atomically

    longest = tmp_path / ("n" * (255 - len(".") - len(".000000000000.tmp")))
    assert check_output_dir(longest) == []
    write_dir_atomically(longest, lambda staging: (staging / "f").write_text("x"))
    assert (longest / "f").read_text() == "x" and listing(tmp_path) == [longest.name, f"{longest.name}/f"]
    with pytest.raises(CliError, match="written next to"):
        check_output_dir(tmp_path / (longest.name + "n"))


def test_the_seed_ranges_are_what_torch_takes():
    """The bounds of the seed checks: torch takes them (a method's seed as its generators'
    seeds, ``seed * 1_000_003 + salt``), and refuses the next integer out."""
    from unlearning.cli import METHOD_SEEDS, TORCH_SEEDS

    for seed in (TORCH_SEEDS.start, TORCH_SEEDS[-1], -1):
        torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
    for seed in (TORCH_SEEDS.start - 1, TORCH_SEEDS[-1] + 1):
        with pytest.raises((ValueError, RuntimeError, OverflowError)):
            torch.Generator().manual_seed(seed)
    for seed in (METHOD_SEEDS.start, METHOD_SEEDS[-1]):
        for salt in (0, 1, 2, 3, 11):
            torch.Generator().manual_seed(seed * 1_000_003 + salt)
    for seed in (METHOD_SEEDS.start - 1, METHOD_SEEDS[-1] + 1):
        with pytest.raises((ValueError, RuntimeError, OverflowError)):
            torch.Generator().manual_seed(seed * 1_000_003 + (11 if seed > 0 else 0))
    torch.manual_seed(0)


def test_the_seeds_of_a_method_configuration_are_bounded_to_what_torch_takes():
    """interference_aware's ``shadow_seed`` seeds the folds' split with ``7_919 + seed`` and a
    training recipe's ``seed`` torch itself: the bounds of their checks are what torch takes,
    and the next integer out is a configuration problem, not "Overflow when unpacking long
    long" from inside a job."""
    from unlearning.cli import SHADOW_SEEDS, TORCH_SEEDS
    from unlearning.methods.interference_aware import shadow_folds
    from unlearning.methods.params import config_problems

    ids = ["a", "b", "c"]
    for seed in (SHADOW_SEEDS.start, SHADOW_SEEDS[-1]):
        assert sorted(i for fold in shadow_folds(ids, 2, seed) for i in fold) == ids
        assert config_problems("interference_aware", {"shadow_seed": seed}) == []
    for seed in (SHADOW_SEEDS.start - 1, SHADOW_SEEDS[-1] + 1):
        with pytest.raises((ValueError, RuntimeError, OverflowError)):
            shadow_folds(ids, 2, seed)
        assert config_problems("interference_aware", {"shadow_seed": seed}) == [
            f"interference_aware parameter 'shadow_seed' must be >= {SHADOW_SEEDS.start} and <= {SHADOW_SEEDS[-1]}, "
            f"got {seed}"]
    for seed in (TORCH_SEEDS.start, TORCH_SEEDS[-1]):
        assert config_problems("interference_aware", {"shadow_recipe": {"seed": seed}}) == []
        assert config_problems("retrain", {"seed": seed, "train": {"seed": seed}}) == []
    for seed in (TORCH_SEEDS.start - 1, TORCH_SEEDS[-1] + 1):
        assert config_problems("interference_aware", {"shadow_recipe": {"seed": seed}}) == [
            f"interference_aware parameter 'shadow_recipe'['seed'] must be >= {TORCH_SEEDS.start} and "
            f"<= {TORCH_SEEDS[-1]}, got {seed}"]
        assert len(config_problems("retrain", {"seed": seed, "train": {"seed": seed}})) == 2


def link_to_empty(tmp_path: Path) -> Path:
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    return tmp_path / "link"


@pytest.mark.parametrize("out, force, message", [
    # the write takes over a real empty directory only: a link was refused after the training
    ("link", False, "--out {link} is a symbolic link (to {target})"),
    ("link", True, "is a symbolic link"),
    # '.' (or '') in an empty folder: the staging folder was made inside it, then it was refused
    (".", False, "--out '.' does not end in a directory name"),
    ("", False, "--out '.' does not end in a directory name"),
    ("..", False, "--out '..' does not end in a directory name"),
], ids=["link", "link --force", "dot", "empty", "dotdot"])
def test_train_refuses_an_output_the_write_cannot_take_before_training(tmp_path, capsys, monkeypatch, out, force,
                                                                      message):
    import unlearning.train

    link = link_to_empty(tmp_path)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(unlearning.train, "train_model", lambda *a, **k: pytest.fail("trained for a bad --out"))
    argv = ["--dataset", "indoor", *TINY, "--device", "cpu", "--out", str(link) if out == "link" else out]
    refused(capsys, train(argv + ["--force"] * force), message.format(link=link, target=tmp_path / "target"))
    assert listing(tmp_path) == ["cwd", "link", "target"]


def test_train_ctrl_c_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import unlearning.train

    monkeypatch.setattr(unlearning.train, "train_model", raise_interrupt)
    rc = ctrl_c(train, ["--dataset", "indoor", *TINY, "--device", "cpu", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 130 and err == "interrupted: nothing was written\n"
    assert listing(tmp_path) == []


def test_train_ctrl_c_during_the_write_says_so_and_leaves_no_part(tmp_path, capsys, monkeypatch):
    import unlearning.train

    def dies_half_way(model, directory, extra=None):
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(unlearning.train, "save_model", dies_half_way)
    rc = ctrl_c(train, ["--dataset", "indoor", *TINY, "--device", "cpu", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 130 and err.startswith(f"interrupted while writing {tmp_path / 'out'}: it holds what it held before")
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert listing(tmp_path) == []


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "v1"
    assert train(["--dataset", "indoor", *TINY, "--device", "cpu", "--out", str(out)]) == 0
    return out


def test_train_refuses_an_existing_checkpoint_unless_forced(checkpoint, tmp_path, capsys):
    # an unlearned checkpoint: its erased cells and lineage must survive a train pointed at it
    erased = tmp_path / "erased"
    assert unlearn_main(["--checkpoint", str(checkpoint), "--instance", "indoor-00001", "--config", FAST,
                         "--out", str(erased), "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in erased.iterdir()}
    assert json.loads(before["config.json"])["erased"] and json.loads(before["config.json"])["lineage"]
    refused(capsys, train(["--dataset", "indoor", *TINY, "--device", "cpu", "--out", str(erased)]),
            f"--out {erased} already exists and is not an empty directory (--force replaces")
    assert {p.name: p.read_bytes() for p in erased.iterdir()} == before

    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    refused(capsys, train(["--dataset", "indoor", *TINY, "--device", "cpu", "--out", str(other), "--force"]),
            "--force replaces a checkpoint")
    assert listing(other) == ["notes.txt"]
    # through a folder that does not exist yet: the checks saw nothing there, the write made the
    # folder, and --force swapped the notes out and deleted them
    refused(capsys, train(["--dataset", "indoor", *TINY, "--device", "cpu", "--out",
                           str(tmp_path / "missing" / ".." / "notes"), "--force"]), "--force replaces a checkpoint")
    assert listing(other) == ["notes.txt"] and not (tmp_path / "missing").exists()

    # --force replaces a checkpoint, in one rename: a fresh one, no lineage, nothing left aside
    assert train(["--dataset", "indoor", *TINY, "--device", "cpu", "--out", str(erased), "--force"]) == 0
    config = json.loads((erased / "config.json").read_text())
    assert "erased" not in config and "lineage" not in config
    assert listing(tmp_path) == ["erased", "erased/config.json", "erased/model.safetensors", "notes",
                                 "notes/notes.txt"]
    # an empty directory is taken as it is
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train(["--dataset", "indoor", *TINY, "--device", "cpu", "--out", str(empty)]) == 0
    assert sorted(p.name for p in empty.iterdir()) == ["config.json", "model.safetensors"]


def test_train_leaves_nothing_half_written(tmp_path, capsys, monkeypatch):
    import unlearning.train

    def dies_half_way(model, directory, extra=None):
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(unlearning.train, "save_model", dies_half_way)
    refused(capsys, train(["--dataset", "indoor", *TINY, "--device", "cpu", "--out", str(tmp_path / "out")]),
            "No space left on device")
    assert listing(tmp_path) == []


@pytest.mark.parametrize("epochs, says", [
    ("2", "training diverged: non-finite weights (NaN or infinity) in "),  # the 2nd step's gradients are NaN
    ("1", "training diverged: the model's segmentation, depth, normal predictions on 8 training images are "
          "not finite (its weights are)"),  # one step: weights of ~1e30, finite, whose outputs overflow
])
def test_a_diverged_training_is_refused_and_writes_nothing(tmp_path, capsys, epochs, says):
    """It wrote a checkpoint that load_model refuses (or one that predicts NaN), printed
    ``"miou": NaN`` (not JSON) and exited 0."""
    args = ["--dataset", "indoor", *TINY, "--device", "cpu", "--lr", "1e30", "--out", str(tmp_path / "out")]
    args[args.index("--epochs") + 1] = epochs
    err = refused(capsys, train(args), says)
    assert err.rstrip().endswith("nothing was written: try a smaller --lr (got 1e+30)")  # no decay to blame
    assert listing(tmp_path) == []


def test_a_diverged_training_with_weight_decay_names_it_too(tmp_path, capsys):
    args = ["--dataset", "indoor", *TINY, "--device", "cpu", "--lr", "1e30", "--weight-decay", "1e-31",
            "--out", str(tmp_path / "out")]
    refused(capsys, train(args), "nothing was written: try a smaller --lr (got 1e+30) or --weight-decay "
                                 "(got 1e-31)")
    assert listing(tmp_path) == []


def test_train_prints_strict_json_with_null_for_a_metric_that_is_not_finite(tmp_path, capsys, monkeypatch):
    import unlearning.evaluate

    monkeypatch.setattr(unlearning.evaluate, "task_metrics", lambda model, data: {"depth": {"abs_err": float("nan"),
                                                                                            "delta1": 0.5}})
    assert train(["--dataset", "indoor", *TINY, "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} in the printed metrics"))
    assert summary["train"] == summary["test"] == {"depth": {"abs_err": None, "delta1": 0.5}}


def test_unlearnd_train_reports_the_error(tmp_path, capsys):
    refused(capsys, unlearnd(["train", "--dataset", "mnist", "--out", str(tmp_path / "out")]), "unknown dataset")
    assert listing(tmp_path) == []


# ----------------------------------------------------------------------------- unlearnd bench


@pytest.fixture
def no_run(monkeypatch):
    """The bench must refuse before it renders or trains anything."""
    monkeypatch.setattr(bench, "load_splits", lambda *a, **k: pytest.fail("rendered data for a bad request"))
    monkeypatch.setattr(bench, "run_suite", lambda *a, **k: pytest.fail("ran the suite for a bad request"))


def bench_refused(capsys, argv: list[str], message: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)
    return refused(capsys, exit_.value.code, message)


@pytest.mark.parametrize("args, files, message", [
    (["--methods", "finetune", "nope"], {}, "--methods: unknown method 'nope'"),
    (["--benchmarks", "nope"], {}, "--benchmarks: suite 'smoke' has no benchmark 'nope'"),
    (["--method-config", "/nonexistent/methods.json"], {}, "--method-config /nonexistent/methods.json does not exist"),
    (["--method-config", "{dir}/bad.json"], {"bad.json": "{steps: 3"}, "bad.json is not JSON"),
    (["--method-config", "{dir}/bin.json"], {"bin.json": b"\xff\xfe\x00"}, "is not JSON: it is not UTF-8 text"),
    (["--method-config", "{dir}/deep.json"], {"deep.json": "[" * 100_000}, "deep.json is nested too deeply"),
    (["--method-config", "{dir}/list.json"], {"list.json": "[]"}, "must hold a JSON object {method: "),
    (["--method-config", "{dir}/m.json"], {"m.json": '{"magic": {}}'}, "unknown method 'magic'"),
    (["--method-config", "{dir}/m.json"], {"m.json": '{"finetune": 3}'}, "'finetune' must map to a JSON object"),
    (["--method-config", "{dir}/m.json"], {"m.json": '{"finetune": {"stepz": 3}}'}, "has no parameter 'stepz'"),
    (["--method-config", "{dir}/m.json"], {"m.json": '{"finetune": {"steps": 3, "steps": 4}}'},
     "m.json is not JSON: the name 'steps' is given twice in one object"),
    (["--device", "tpu"], {}, "--device 'tpu' is not a device"),
    (["--out", "{dir}"], {}, "is a directory; --out is the results JSON file"),
    # the summary and plot go next to --out with these suffixes: over the results (and over
    # every checkpoint of them, deleted as an earlier run's stale summary)
    (["--out", "{dir}/r.md"], {}, "written next to the results JSON as r.md and r.png, over the JSON"),
    (["--out", "{dir}/r.png"], {}, "--out is the JSON file, e.g. {dir}/r.json"),
    # a seed or method twice would run twice: the same run twice in the document
    (["--seeds", "0", "1", "0"], {}, "--seeds: 0 given twice"),
    (["--methods", "ssd", "finetune", "ssd"], {}, "--methods: 'ssd' given twice"),
    (["--workers", "-1"], {}, "--workers must be 0 or more, got -1"),
    # refused in the run, after the cache folder was made
    (["--settings", "full:99"], {}, "unknown settings ['full:99'] for suite 'smoke'"),
    # a directory, with no file name: a ValueError from with_suffix
    (["--out", "."], {}, "--out '.' is a directory, not a file name"),
    (["--out", "/"], {}, "--out '/' is a directory, not a file name"),
    (["--out", ""], {}, "--out '' is a directory, not a file name"),
    # a seed that torch refuses (as the methods' generators' seed, x 1_000_003): after the data was made
    (["--seeds", "0", str(2**70)], {}, f"--seeds {2**70} is out of range: a seed is an integer from"),
    pytest.param(["--out", "/proc/forbidden/r.json"], {}, "nothing can be written in /proc",
                 marks=pytest.mark.skipif(NO_PROC, reason="no /proc")),
], ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_bench_refuses_bad_arguments_before_running(tmp_path, capsys, no_run, args, files, message):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name, content in files.items():
        (inputs / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out" / "r.json"
    argv = ["--suite", "smoke", "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--out", str(out)]
    bench_refused(capsys, argv + [a.format(dir=inputs) for a in args], message.replace("{dir}", str(inputs)))
    assert listing(tmp_path) == sorted(["inputs", *(f"inputs/{n}" for n in files)])


@pytest.mark.parametrize("args, message", [
    (["--seeds", "1"], "--merge runs nothing; it does not take --seeds"),
    (["--suite", "full"], "--merge runs nothing; it does not take --suite"),  # pieces are of their own suite
    (["--workers", "2", "--no-shadow"], "it does not take --no-shadow, --workers"),
    (["--cache-dir", "{dir}/cache"], "it does not take --cache-dir"),  # ignored, silently
    (["--out", "{dir}/merged.md"], "--out is the JSON file"),
    (["--out", ""], "--out '' is a directory, not a file name"),
    (["--out", "."], "--out '.' is a directory, not a file name"),
], ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_bench_merge_refuses_options_of_a_run_in_one_line(tmp_path, capsys, no_run, args, message):
    piece = tmp_path / "piece.json"
    piece.write_text(json.dumps({"suite": "smoke", "device": "cpu", "config": {}, "results": [{"method": "m"}]}))
    argv = ["--merge", str(piece), "--out", str(tmp_path / "merged.json")]
    bench_refused(capsys, argv + [a.format(dir=tmp_path) for a in args], message)
    assert listing(tmp_path) == ["piece.json"]


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "holds an array, not an object"),
    ('"results"', "holds a string, not an object"),
    ("{not json", "is not JSON"),
    ('{"suite": "smoke", "device": "cpu", "config": [], "results": []}', "a piece is not a well-formed results"),
    ('{"suite": "smoke", "device": "cpu", "config": {}, "results": []}', "the pieces hold no results"),
    # the summary failed on these with a traceback, after the merged JSON was written
    ('{"suite": "smoke", "device": "cpu", "config": {}, "results": [{"method": "m"}]}',
     "run 0 of {piece} is not a run of unlearning.bench: no ['benchmark', "),
    ('{"suite": "smoke", "device": "cpu", "config": {}, "results": [RUN_UIS_"0.5"]}', "uis '0.5' is not a number"),
    ('{"suite": "smoke", "device": "cpu", "config": {}, "results": [RUN_N_"8"]}', "n_forget '8' is not an integer"),
    ('{"suite": "smoke", "device": "cpu", "config": {}, "results": {}}', "results are not a list of runs"),
], ids=["array", "string", "not JSON", "config array", "no results", "run without fields", "uis a string",
        "n_forget a string", "results an object"])
def test_bench_merge_refuses_what_is_not_a_results_document(tmp_path, capsys, content, message):
    run = {"benchmark": "b", "setting": "full", "forget_tasks": ["t"], "n_forget": 8, "seed": 0, "method": "m",
           "uis": 1.0, "uis_task": 0.0, "uis_inst": 1.0, "mia_auc": 0.5, "mia_auc_original": 0.9,
           "mia_auc_retrain": 0.5, "forget_gap": 0.0, "seconds": 1.0, "retrain_seconds": 10.0}
    for name, value in (("UIS", '"0.5"'), ("N", '"8"')):
        field = {"UIS": "uis", "N": "n_forget"}[name]
        content = content.replace(f"RUN_{name}_{value}", json.dumps({**run, field: json.loads(value)}))
    piece = tmp_path / "piece.json"
    piece.write_text(content)
    bench_refused(capsys, ["--merge", str(piece), "--out", str(tmp_path / "m.json")], message.format(piece=piece))
    assert listing(tmp_path) == ["piece.json"]
    bench_refused(capsys, ["--merge", str(tmp_path / "missing.json"), "--out", str(tmp_path / "m.json")],
                  "--merge " + str(tmp_path / "missing.json") + " does not exist")


def test_unlearnd_bench_exits_2(tmp_path, capsys, no_run):
    with pytest.raises(SystemExit) as exit_:
        unlearnd(["bench", "--methods", "nope", "--out", str(tmp_path / "r.json"), "--cache-dir", str(tmp_path / "c")])
    refused(capsys, exit_.value.code, "unknown method 'nope'")
    assert listing(tmp_path) == []


# ----------------------------------------------------------------------------- unlearnd unlearn


def run_unlearn(args: list[str]) -> int:
    return unlearn_main(args + ["--no-progress"])


@pytest.fixture
def no_job(monkeypatch):
    import unlearning.job

    monkeypatch.setattr(unlearning.job, "run_unlearning_job", lambda *a, **k: pytest.fail("ran the job"))


@pytest.mark.parametrize("out, message", [
    pytest.param("/proc/forbidden/x", "--out /proc/forbidden/x cannot be created: nothing can be written in /proc",
                 marks=pytest.mark.skipif(NO_PROC, reason="no /proc")),
    ("{file}/x", "is not a directory"),
    ("{dir}/" + "n" * 238, "the name '." + "n" * 238 + ".000000000000.tmp' (written next to"),  # was after the job
])
def test_unlearn_checks_the_output_location_before_the_job(checkpoint, tmp_path, capsys, no_job, out, message):
    afile = tmp_path / "a-file"
    afile.write_text("keep me")
    refused(capsys, run_unlearn(["--checkpoint", str(checkpoint), "--instance", "indoor-00001", "--device", "cpu",
                                 "--out", out.format(file=afile, dir=tmp_path)]), message)
    assert listing(tmp_path) == ["a-file"]


@pytest.mark.parametrize("out, message", [
    ("link", "--out {link} is a symbolic link (to {target})"),  # was refused after the job
    (".", "--out '.' does not end in a directory name"),
], ids=["link", "dot"])
def test_unlearn_refuses_an_output_the_write_cannot_take_before_the_job(checkpoint, tmp_path, capsys, monkeypatch,
                                                                        no_job, out, message):
    link = link_to_empty(tmp_path)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    refused(capsys, run_unlearn(["--checkpoint", str(checkpoint), "--instance", "indoor-00001", "--device", "cpu",
                                 "--out", str(link) if out == "link" else out]),
            message.format(link=link, target=tmp_path / "target"))
    assert listing(tmp_path) == ["cwd", "link", "target"]


def test_unlearn_refuses_reference_scenes_no_memory_here_holds_before_rendering(checkpoint, tmp_path, capsys,
                                                                               monkeypatch, no_job):
    import unlearning.data

    monkeypatch.setattr(unlearning.data, "load_splits", lambda *a, **k: pytest.fail("rendered the data"))
    err = refused(capsys, run_unlearn(["--checkpoint", str(checkpoint), "--instance", "indoor-00001", "--device", "cpu",
                                       "--reference-scenes", "10000000000", "--out", str(tmp_path / "out")]),
                  "this job needs at least")
    assert "10000000000 reference scenes: " in err and err.rstrip().endswith("give fewer --reference-scenes")
    assert listing(tmp_path) == []


def test_unlearn_refuses_a_seed_torch_does_not_take_before_any_work(checkpoint, tmp_path, capsys, monkeypatch,
                                                                     no_job):
    import unlearning.data

    monkeypatch.setattr(unlearning.data, "load_splits", lambda *a, **k: pytest.fail("read the data first"))
    refused(capsys, run_unlearn(["--checkpoint", str(checkpoint), "--instance", "indoor-00001", "--device", "cpu",
                                 "--seed", str(2**70), "--out", str(tmp_path / "out")]),
            f"--seed {2**70} is out of range: a seed is an integer from")
    assert listing(tmp_path) == []


def test_unlearn_ctrl_c_is_one_line_and_writes_nothing(checkpoint, tmp_path, capsys, monkeypatch):
    import unlearning.job

    monkeypatch.setattr(unlearning.job, "run_unlearning_job", raise_interrupt)
    rc = ctrl_c(unlearn_main, ["--checkpoint", str(checkpoint), "--instance", "indoor-00001", "--device", "cpu",
                               "--out", str(tmp_path / "out")])  # with its progress bar
    err = capsys.readouterr().err
    assert rc == 130 and err.splitlines()[-1] == "interrupted: nothing was written" and "Traceback" not in err
    assert listing(tmp_path) == []


@pytest.mark.parametrize("args, message", [
    (["--instance", "indoor-00001", "--tasks", "normals"], "unknown task 'normals' for dataset 'indoor'"),
    (["--instance", "nobody"], "unknown instance 'nobody' in dataset 'indoor'"),
    (["--cell", "indoor-00001:albedo"], "unknown task 'albedo'"),
    (["--instance", "indoor-test-00001"], "instance 'indoor-test-00001' is in the test set: held-out data"),
], ids=["task", "instance", "cell", "test instance"])
def test_unlearn_refuses_bad_cells_before_its_progress_bar(checkpoint, tmp_path, capsys, no_job, args, message):
    """With the progress bar on (the default), a refused cell is still the one ``error:`` line
    on stderr: the bar at 0% used to be drawn first, the error behind it on the same line."""
    refused(capsys, unlearn_main(["--checkpoint", str(checkpoint), *args, "--device", "cpu",
                                  "--out", str(tmp_path / "out")]), message)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("config, files, message", [
    ("/nonexistent/config.json", {}, "--config file /nonexistent/config.json does not exist"),
    ("missing.json", {}, "--config file missing.json does not exist"),
    ("{dir}/bad.json", {"bad.json": "{steps: 3"}, "bad.json is not JSON"),
    ("{dir}/bin.json", {"bin.json": b"\xff\xfe\x00"}, "is not JSON: it is not UTF-8 text"),
    ("{dir}/list.json", {"list.json": "[1]"}, "--config must be a JSON object of hyper-parameters, got an array"),
    ("[" * 100_000, {}, "--config is neither a JSON object nor a file holding one: nested too deeply"),
    ("steps=3", {}, "--config is neither a JSON object nor a file holding one"),
    ("{dir}", {}, "is not a file"),
    ('{{"steps": 3, "steps": 4}}', {}, "--config is neither a JSON object nor a file holding one: the name 'steps' is "
                                     "given twice in one object"),
    ("{dir}/twice.json", {"twice.json": '{"steps": 3, "steps": 4}'}, "twice.json is not JSON: the name 'steps'"),
], ids=["absent", "relative absent", "bad JSON", "binary", "array", "deep", "neither", "directory", "name twice",
        "name twice in a file"])
def test_unlearn_config_names_a_missing_or_bad_file(checkpoint, tmp_path, capsys, no_job, config, files, message):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name, content in files.items():
        (inputs / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    refused(capsys, run_unlearn(["--checkpoint", str(checkpoint), "--instance", "indoor-00001", "--device", "cpu",
                                 "--config", config.format(dir=inputs), "--out", str(tmp_path / "out")]), message)
    assert not (tmp_path / "out").exists()


def test_unlearn_config_from_a_file_still_works(checkpoint, tmp_path, capsys):
    (tmp_path / "fast.json").write_text('{"steps": 2}')
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert run_unlearn(["--checkpoint", str(checkpoint), "--instance", "indoor-00001", "--device", "cpu",
                            "--method", "finetune", "--config", "fast.json", "--out", "v2"]) == 0
    finally:
        os.chdir(cwd)
    entry = json.loads((tmp_path / "v2" / "config.json").read_text())["lineage"][0]
    assert entry["config"] == {"steps": 2}


def damaged(checkpoint: Path, where: Path, config: bytes | dict) -> Path:
    where.mkdir()
    (where / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    if isinstance(config, dict):
        config = json.dumps({**json.loads((checkpoint / "config.json").read_text()), **config}).encode()
    (where / "config.json").write_bytes(config)
    return where


@pytest.mark.parametrize("config, message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "config.json is not JSON: it is not UTF-8 text"),
    (b"[" * 100_000, "config.json is nested too deeply to parse"),
    (b'{"model": {}, "model": {}}', "config.json is not JSON: the name 'model' is given twice in one object"),
    ({"erased": "abc"}, "'erased' must be a list of [instance_id, task] pairs of strings; found 'abc'"),
    ({"erased": [["indoor-00001"]]}, "'erased' must be a list of [instance_id, task] pairs of strings; "
                                     "found ['indoor-00001']"),
    ({"erased": [[["x"], "depth"]]}, "found [['x'], 'depth']"),
    ({"erased": None}, "'erased' must be a list"),
    ({"lineage": "abc"}, "'lineage' must be a list of earlier jobs, got a string"),
], ids=["binary", "deep", "name twice", "erased string", "erased single", "erased nested", "erased null",
        "lineage string"])
def test_unlearn_refuses_a_checkpoint_with_a_damaged_config(checkpoint, tmp_path, capsys, no_job, config, message):
    bad = damaged(checkpoint, tmp_path / "bad", config)
    err = refused(capsys, run_unlearn(["--checkpoint", str(bad), "--instance", "indoor-00002", "--device", "cpu",
                                       "--out", str(tmp_path / "out")]), message)
    assert str(bad / "config.json") in err
    assert not (tmp_path / "out").exists()


def test_unlearn_refuses_a_device_that_is_not_one(checkpoint, tmp_path, capsys, no_job):
    refused(capsys, run_unlearn(["--checkpoint", str(checkpoint), "--instance", "indoor-00001", "--device", "tpu",
                                 "--out", str(tmp_path / "out")]), "--device 'tpu' is not a device")
    assert listing(tmp_path) == []


def test_unlearn_reports_weights_that_diverge_and_writes_nothing(checkpoint, tmp_path, capsys):
    rc = run_unlearn(["--checkpoint", str(checkpoint), "--instance", "indoor-00001", "--device", "cpu",
                      "--method", "finetune", "--config", '{"steps": 3, "lr": 1e30}', "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: finetune left non-finite weights") and "Traceback" not in err
    assert listing(tmp_path) == []


def test_unlearn_refuses_a_configuration_value_before_the_job(checkpoint, tmp_path, capsys, monkeypatch):
    import unlearning.data

    monkeypatch.setattr(unlearning.data, "load_splits", lambda *a, **k: pytest.fail("read the data first"))
    refused(capsys, run_unlearn(["--checkpoint", str(checkpoint), "--instance", "indoor-00001", "--device", "cpu",
                                 "--config", '{"steps": 0}', "--out", str(tmp_path / "out")]),
            "interference_aware parameter 'steps' must be >= 1, got 0")
    assert listing(tmp_path) == []
