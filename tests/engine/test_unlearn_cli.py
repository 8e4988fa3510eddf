"""``python -m unlearning.unlearn`` / ``unlearnd unlearn``: the engine erasing cells from a
checkpoint without the service, on a tiny checkpoint of real rendered scenes."""
import hashlib
import json

import pytest
import torch

from app.cli import main as unlearnd
from unlearning.model import load_model
from unlearning.train import main as train_main
from unlearning.unlearn import main

pytestmark = pytest.mark.usefixtures("torch_single_thread")

FAST = '{"steps": 12, "tau_refresh": 0}'


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of `python -m unlearning.train` on 12 indoor scenes of 16×24 pixels."""
    out = tmp_path_factory.mktemp("ckpt") / "v1"
    args = ["--dataset", "indoor", "--n-train", "12", "--n-test", "8", "--height", "16", "--width", "24",
            "--epochs", "4", "--model-width", "8", "--model-depth", "2", "--head-width", "8"]
    assert train_main(args + ["--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    return out


def run(args, capsys) -> tuple[int, dict | None, str]:
    rc = main(args + ["--no-progress", "--device", "cpu"])
    captured = capsys.readouterr()
    return rc, (json.loads(captured.out) if rc == 0 else None), captured.err


def test_a_full_then_a_partial_erasure_chain_new_checkpoints(checkpoint, tmp_path, capsys):
    source_sha = sha(checkpoint / "model.safetensors")
    v2, v3 = tmp_path / "v2", tmp_path / "v3"

    rc, summary, _ = run(["--checkpoint", str(checkpoint), "--instance", "indoor-00003", "--config", FAST,
                          "--out", str(v2)], capsys)
    assert rc == 0
    assert summary["metrics"]["mode"] == "full"
    assert sorted(map(tuple, summary["erased"])) == [("indoor-00003", t) for t in ("depth", "normal", "segmentation")]
    assert sha(checkpoint / "model.safetensors") == source_sha  # the source version is never touched
    manifest2 = json.loads((v2 / "config.json").read_text())
    source_manifest = json.loads((checkpoint / "config.json").read_text())
    assert manifest2["dataset"] == source_manifest["dataset"] and manifest2["train"] == source_manifest["train"]
    assert manifest2["lineage"][0]["parent_sha256"] == source_sha
    assert manifest2["lineage"][0]["metrics"]["mia_auc_original"] == summary["metrics"]["mia_auc_original"]

    # partial-task on the new version: only depth of another instance; the earlier erasure is carried
    rc, summary, _ = run(["--checkpoint", str(v2), "--instance", "indoor-00005", "--tasks", "depth",
                          "--config", FAST, "--out", str(v3)], capsys)
    assert rc == 0
    assert summary["metrics"]["mode"] == "partial" and summary["metrics"]["forget_tasks"] == ["depth"]
    manifest3 = json.loads((v3 / "config.json").read_text())
    assert sorted(map(tuple, manifest3["erased"])) == sorted(
        [("indoor-00003", t) for t in ("segmentation", "depth", "normal")] + [("indoor-00005", "depth")])
    assert [e["parent_sha256"] for e in manifest3["lineage"]] == [source_sha, sha(v2 / "model.safetensors")]

    # interference_aware promises the heads of the tasks it does not forget: bit for bit
    before, after = load_model(v2).state_dict(), load_model(v3).state_dict()
    protected = [n for n in after if n.startswith(("heads.segmentation.", "heads.normal."))]
    assert protected
    for name in protected:
        assert torch.equal(after[name], before[name]), name
    assert any(not torch.equal(after[n], before[n]) for n in after if n.startswith("heads.depth."))

    # a cell erased earlier in the lineage is refused, naming it, and nothing is written
    rc, _, err = run(["--checkpoint", str(v3), "--cell", "indoor-00005:depth", "--out", str(tmp_path / "v4")], capsys)
    assert rc == 2 and "already erased" in err and "indoor-00005" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v2", "v3"]


def test_an_instance_erased_from_some_tasks_is_erased_from_the_rest(checkpoint, tmp_path, capsys):
    # `--instance X` is all of X's tasks: after a partial erasure, the ones it still holds
    # (it used to expand to every task and refuse the request for the erased one)
    v2, v3 = tmp_path / "v2", tmp_path / "v3"
    rc, _, _ = run(["--checkpoint", str(checkpoint), "--instance", "indoor-00004", "--tasks", "depth",
                    "--config", FAST, "--out", str(v2)], capsys)
    assert rc == 0
    rc, summary, _ = run(["--checkpoint", str(v2), "--instance", "indoor-00004", "--config", FAST, "--out", str(v3)],
                         capsys)
    assert rc == 0
    assert sorted(map(tuple, summary["erased"])) == [("indoor-00004", "normal"), ("indoor-00004", "segmentation")]
    assert sorted(summary["metrics"]["forget_tasks"]) == ["normal", "segmentation"]
    manifest3 = json.loads((v3 / "config.json").read_text())
    assert sorted(map(tuple, manifest3["erased"])) == [("indoor-00004", t) for t in ("depth", "normal", "segmentation")]

    # nothing of it is left: refused as erased, naming it, and nothing written
    rc, _, err = run(["--checkpoint", str(v3), "--instance", "indoor-00004", "--out", str(tmp_path / "v4")], capsys)
    assert rc == 2 and "already erased" in err and "indoor-00004" in err
    # an explicit --tasks naming an erased task is still refused
    rc, _, err = run(["--checkpoint", str(v2), "--instance", "indoor-00004", "--tasks", "depth", "normal",
                      "--out", str(tmp_path / "v5")], capsys)
    assert rc == 2 and "already erased" in err and "depth" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v2", "v3"]


def test_reference_scenes_are_what_the_method_reads_and_the_lineage_records(checkpoint, tmp_path, capsys):
    own, plain = tmp_path / "own", tmp_path / "plain"
    args = ["--checkpoint", str(checkpoint), "--instance", "indoor-00002", "--config", FAST]
    rc, summary, _ = run(args + ["--out", str(own), "--reference-scenes", "6"], capsys)
    assert rc == 0 and summary["metrics"]["reference"] == {"source": "own", "instances": 6}
    entry = json.loads((own / "config.json").read_text())["lineage"][0]
    assert entry["reference_scenes"] == 6 and entry["metrics"]["reference"]["source"] == "own"
    rc, summary_plain, _ = run(args + ["--out", str(plain)], capsys)
    assert rc == 0 and summary_plain["metrics"]["reference"] == {"source": "test_split", "instances": 8}
    assert "reference_scenes" not in json.loads((plain / "config.json").read_text())["lineage"][0]
    # the audit's attack keeps the test split: the original model's AUC is the same
    assert summary["metrics"]["mia_auc_original"] == summary_plain["metrics"]["mia_auc_original"]
    assert sha(own / "model.safetensors") != sha(plain / "model.safetensors")


def test_unlearnd_unlearn_delegates_with_every_argument(checkpoint, tmp_path, capsys):
    out, config = tmp_path / "v2", tmp_path / "finetune.json"
    config.write_text('{"steps": 3}')  # --config also takes a file
    rc = unlearnd(["unlearn", "--checkpoint", str(checkpoint), "--cell", "indoor-00001:normal", "--method",
                   "finetune", "--config", str(config), "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["erased"] == [["indoor-00001", "normal"]]
    entry = json.loads((out / "config.json").read_text())["lineage"][0]
    assert entry["method"] == "finetune" and entry["config"] == {"steps": 3}


@pytest.mark.parametrize("args, message", [
    (["--instance", "nobody"], "unknown instance 'nobody'"),
    (["--instance", "indoor-00001", "--tasks", "albedo"], "unknown task 'albedo'"),
    (["--tasks", "depth"], "--tasks selects tasks of the --instance arguments"),
    ([], "the forget set is empty"),
    (["--cell", "indoor-00001"], "--cell takes INSTANCE:TASK"),
    (["--instance", "indoor-00001", "--method", "magic"], "unknown method 'magic'"),
    (["--instance", "indoor-00001", "--config", '{"stepz": 3}'], "has no parameter 'stepz'"),
    (["--instance", "indoor-00001", "--config", "{steps: 3}"], "--config is neither a JSON object"),
    (["--instance", "indoor-00001", "--method", "finetune", "--calibrate"], "calibration is interference_aware's"),
    # a usage error, not a traceback (an AttributeError inside the method, exit 1)
    (["--instance", "indoor-00001", "--config", '{"shadow_scores": "x"}'], "'shadow_scores' must be a mapping"),
    (["--instance", "indoor-00001", "--config", '{"shadow_scores": {"partial": {"indoor-00001": {"depth": 5}}}}'],
     "'shadow_scores' ['partial']['indoor-00001']['depth'] must be a score in [0, 1], got 5"),
    (["--instance", "indoor-00001", "--config", f'{{"shadow_seed": {2**64}}}'], "'shadow_seed' must be >= "),
    (["--instance", "indoor-00001", "--reference-scenes", "-2"], "--reference-scenes must be 0 or more, got -2"),
    (["--instance", "indoor-00001", "--method", "finetune", "--reference-scenes", "4"],
     "a held-out reference is interference_aware's; method 'finetune' reads none"),
    # fixed levels: no held-out data nor calibration is read (both were computed and recorded as used)
    (["--instance", "indoor-00001", "--calibrate", "--config", '{"tau": {"segmentation": 1, "depth": 1, "normal": 1}}'],
     "--calibrate sets the levels interference_aware forgets toward; the --config gives fixed levels 'tau'"),
    (["--instance", "indoor-00001", "--reference-scenes", "3", "--config",
      '{"tau": {"segmentation": 1, "depth": 1, "normal": 1}}'], "--reference-scenes sets the levels"),
    (["--instance", "indoor-00001", "--calibrate", "--config",
      '{"shadow_scores": {"full": {}, "partial": {}}}'], "--calibrate computes the shadow scores"),
])
def test_bad_requests_exit_2_naming_the_problem_and_write_nothing(checkpoint, tmp_path, capsys, args, message):
    rc, _, err = run(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")] + args, capsys)
    assert rc == 2
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_the_output_is_never_the_source_or_a_directory_with_files(checkpoint, tmp_path, capsys):
    source_sha = sha(checkpoint / "model.safetensors")
    rc, _, err = run(["--checkpoint", str(checkpoint), "--instance", "indoor-00001", "--out", str(checkpoint)], capsys)
    assert rc == 2 and "never replaces one" in err
    rc, _, err = run(["--checkpoint", str(checkpoint), "--instance", "indoor-00001", "--out", str(checkpoint / "v2")],
                     capsys)
    assert rc == 2 and "is inside the source checkpoint" in err and not (checkpoint / "v2").exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    rc, _, err = run(["--checkpoint", str(checkpoint), "--instance", "indoor-00001", "--out", str(taken)], capsys)
    assert rc == 2 and "already exists" in err
    assert (taken / "notes.txt").read_text() == "keep me" and sha(checkpoint / "model.safetensors") == source_sha
    rc, _, err = run(["--checkpoint", str(tmp_path / "missing"), "--instance", "indoor-00001",
                      "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and f"checkpoint {tmp_path / 'missing'} does not exist" in err
    rc, _, err = run(["--checkpoint", str(taken), "--instance", "indoor-00001", "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and "is not a checkpoint" in err


def test_a_checkpoint_without_a_dataset_spec_is_refused(checkpoint, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    manifest = json.loads((checkpoint / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({"model": manifest["model"]}))
    rc, _, err = run(["--checkpoint", str(bare), "--instance", "indoor-00001", "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and "has no 'dataset' spec" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda m: m.pop("model"), "has no 'model' section"),
    (lambda m: m["model"].update(colour=3), "unknown fields ['colour']"),
    (lambda m: m["model"].update(width=0), "'model.width' must be a positive integer"),
    (lambda m: m["model"]["tasks"].update(albedo=3), "unknown task 'albedo'"),
    ("weights", "is not a readable safetensors file"),
])
def test_a_damaged_checkpoint_exits_2_naming_the_file(checkpoint, tmp_path, capsys, damage, message):
    bad = tmp_path / "bad"
    bad.mkdir()
    manifest = json.loads((checkpoint / "config.json").read_text())
    weights = (checkpoint / "model.safetensors").read_bytes()
    if damage == "weights":
        weights = b"\xff" * 64
    else:
        damage(manifest)
    (bad / "model.safetensors").write_bytes(weights)
    (bad / "config.json").write_text(json.dumps(manifest))
    rc, _, err = run(["--checkpoint", str(bad), "--instance", "indoor-00001", "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and message in err and str(bad) in err
    assert not (tmp_path / "out").exists()


def test_a_version_folder_of_the_service_store_is_read_through_its_manifest(checkpoint, tmp_path, capsys):
    from model_store.local import LocalModelStore

    manifest = json.loads((checkpoint / "config.json").read_text())
    store = LocalModelStore(tmp_path / "models")
    store.put_version(load_model(checkpoint), model_name="indoor", version=1, parent=None, dataset=manifest["dataset"],
                      erased_cells=[["indoor-00002", "depth"]], train_config=manifest["train"])
    folder = tmp_path / "models" / "indoor" / "v1"

    rc, _, err = run(["--checkpoint", str(folder), "--cell", "indoor-00002:depth", "--out", str(tmp_path / "x")], capsys)
    assert rc == 2 and "already erased" in err  # the lineage's erasures come from manifest.json
    rc, summary, _ = run(["--checkpoint", str(folder), "--cell", "indoor-00002:normal", "--config", FAST,
                          "--out", str(tmp_path / "v2")], capsys)
    assert rc == 0 and summary["metrics"]["mode"] == "partial"
    written = json.loads((tmp_path / "v2" / "config.json").read_text())
    assert written["dataset"] == manifest["dataset"] and written["train"] == manifest["train"]
    assert sorted(written["erased"]) == [["indoor-00002", "depth"], ["indoor-00002", "normal"]]

    (folder / "model.safetensors").write_bytes((tmp_path / "v2" / "model.safetensors").read_bytes())
    rc, _, err = run(["--checkpoint", str(folder), "--cell", "indoor-00003:normal", "--out", str(tmp_path / "v3")],
                     capsys)
    assert rc == 2 and "does not match the sha256" in err


@pytest.mark.parametrize("damage", [lambda m: m.pop("sha256"), lambda m: m.update(sha256=""),
                                    lambda m: m.update(sha256=None), lambda m: m.update(sha256="ABC")],
                         ids=["missing", "empty", "null", "not-hex"])
def test_a_store_folder_without_the_sha256_of_its_weights_is_refused(checkpoint, tmp_path, capsys, damage):
    """The weights of a store folder are checked against its manifest's sha256, which must be
    there: without it (or with an empty one) tampered weights were unlearned from, where the
    store's own load refuses the folder."""
    from model_store import DamagedManifest
    from model_store.local import LocalModelStore
    from unlearning.model import save_model

    manifest = json.loads((checkpoint / "config.json").read_text())
    store = LocalModelStore(tmp_path / "models")
    model = load_model(checkpoint)
    store.put_version(model, model_name="indoor", version=1, parent=None, dataset=manifest["dataset"],
                      train_config=manifest["train"])
    folder = tmp_path / "models" / "indoor" / "v1"
    stored = json.loads((folder / "manifest.json").read_text())
    damage(stored)
    (folder / "manifest.json").write_text(json.dumps(stored))
    with torch.no_grad():
        model.heads["depth"].out.weight.zero_()  # weights the store never recorded
    (folder / "model.safetensors").write_bytes(save_model(model, tmp_path / "tampered").read_bytes())

    with pytest.raises(DamagedManifest, match="sha256"):
        store.load("indoor", 1)
    rc, _, err = run(["--checkpoint", str(folder), "--cell", "indoor-00003:normal", "--config", FAST,
                      "--out", str(tmp_path / "v2")], capsys)
    assert rc == 2 and f"{folder / 'manifest.json'} has no valid 'sha256' of its weights" in err
    assert not (tmp_path / "v2").exists()


@pytest.mark.parametrize("value", [{}, False, 0, "", None])
def test_a_store_folder_whose_erased_cells_are_damaged_is_refused_not_read_as_none_erased(checkpoint, tmp_path,
                                                                                            capsys, value):
    """``erased_cells`` of {} or null was read as "nothing erased": the next job trained and
    unlearned on cells erased earlier in the lineage. The store refuses such a manifest; so does the CLI."""
    from model_store import DamagedManifest
    from model_store.local import LocalModelStore

    manifest = json.loads((checkpoint / "config.json").read_text())
    store = LocalModelStore(tmp_path / "models")
    store.put_version(load_model(checkpoint), model_name="indoor", version=1, parent=None, dataset=manifest["dataset"],
                      erased_cells=[["indoor-00002", "depth"]], train_config=manifest["train"])
    folder = tmp_path / "models" / "indoor" / "v1"
    stored = json.loads((folder / "manifest.json").read_text())
    stored["erased_cells"] = value
    (folder / "manifest.json").write_text(json.dumps(stored))
    with pytest.raises(DamagedManifest):
        store.manifest("indoor", 1)
    rc, _, err = run(["--checkpoint", str(folder), "--cell", "indoor-00003:normal", "--config", FAST,
                      "--out", str(tmp_path / "v2")], capsys)
    assert rc == 2 and f"{folder / 'manifest.json'}: 'erased' must be a list" in err
    assert not (tmp_path / "v2").exists()


def test_non_finite_metrics_are_written_as_null(checkpoint, tmp_path, capsys, monkeypatch):
    """An infinite UIS (a perfect error lost) was printed and written into the lineage as
    Infinity, which strict JSON readers refuse; the service records it as null."""
    import unlearning.job

    real = unlearning.job.run_unlearning_job

    def infinite(*args, **kwargs):
        result = real(*args, **kwargs)
        result.metrics.update(uis=float("inf"), uis_task=float("nan"))
        return result

    monkeypatch.setattr(unlearning.job, "run_unlearning_job", infinite)
    out = tmp_path / "v2"
    rc, summary, _ = run(["--checkpoint", str(checkpoint), "--instance", "indoor-00002", "--config", FAST,
                          "--out", str(out)], capsys)
    assert rc == 0 and summary["metrics"]["uis"] is None and summary["metrics"]["uis_task"] is None
    text = (out / "config.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text)["lineage"][0]["metrics"]["uis"] is None


@pytest.mark.parametrize("request_kwargs, message", [
    # iterated, a string was its characters ("unknown instance 'i'"), one cell its two ids
    # ("unknown task 'n'"), and a string of cells an IndexError
    ({"instances": "indoor-00001"}, "instances is a list of instance ids, got the string 'indoor-00001'"),
    ({"instances": ["indoor-00001"], "only_tasks": "depth"}, "only_tasks is a list of task names, got the string"),
    ({"cells": ("indoor-00001", "depth")}, "got one cell ('indoor-00001', 'depth'): pass [('indoor-00001', 'depth')]"),
    ({"cells": "indoor-00001:depth"}, "cells is a list of (instance_id, task) pairs, got the string"),
    ({"cells": {"indoor-00001": "depth"}}, "cells is a list of (instance_id, task) pairs, got a dict"),
    ({"cells": [("indoor-00001", "depth", "normal")]}, "a cell is an (instance_id, task) pair, got"),
])
def test_the_python_api_names_a_request_that_is_no_list(checkpoint, tmp_path, request_kwargs, message):
    from unlearning.unlearn import UnlearnCliError, unlearn_checkpoint

    with pytest.raises(UnlearnCliError) as err:
        unlearn_checkpoint(checkpoint, tmp_path / "out", config={"steps": 2, "tau_refresh": 0}, device="cpu",
                           progress=False, **request_kwargs)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()
