"""Code competitions: a package of a trained, blended tiny competition, and `infer` run from the
package alone (its own wheel installed in a fresh folder) giving make submit's exact bytes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import COMPETITION, EXPERIMENT, make_competition, write_yaml
from pipeline import ensemble, folds, infer, package, predict, submit, train
from pipeline.models import predictor as inference
from pipeline.packaging import build as package_build, reader
from pipeline.core import provenance
from pipeline.core.artifacts import as_written, write_csv

EXPERIMENTS = {  # one with fixed views, one choosing them on the OOF (test gets the chosen only)
    "lenet5": {**EXPERIMENT, "tta": {"views": "hflip"}},
    "lenet5b": {**EXPERIMENT, "seed": 3, "tta": {"views": "auto", "max_batch": 40}},
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny competition trained, predicted, blended, submitted and packaged."""
    root = tmp_path_factory.mktemp("package")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        make_competition(root / "data/tiny", sample="proba")
        write_yaml(root / "configs/tiny/competition.yaml", COMPETITION)
        for name, exp in EXPERIMENTS.items():
            write_yaml(root / f"configs/tiny/{name}.yaml", exp)
        write_yaml(root / "configs/tiny/ensemble.yaml",
                   {"competition": "competition.yaml", "experiments": list(EXPERIMENTS),
                    "trials": 5, "fallback_to_equal": False, "nested_cv": False})
        folds.main(["configs/tiny/competition.yaml"])
        for name in EXPERIMENTS:
            train.main([f"configs/tiny/{name}.yaml"])
            predict.main([f"configs/tiny/{name}.yaml"])
        ensemble.main(["configs/tiny/ensemble.yaml"])
        submit.main(["configs/tiny/ensemble.yaml"])
        package.main(["configs/tiny/ensemble.yaml"])
    return root


def fresh_copy(built: Path, dest: Path) -> Path:
    """Only the package, the test images and the sample submission, in a new folder."""
    shutil.copytree(built / "packages/tiny", dest / "pkg")
    shutil.copytree(built / "data/tiny/test", dest / "test")
    shutil.copy(built / "data/tiny/sample_submission.csv", dest / "sample.csv")
    return dest


def args(root: Path, *extra: str) -> list[str]:
    return [str(root / "pkg"), "--test-images", str(root / "test"),
            "--sample-submission", str(root / "sample.csv"), "--out", str(root / "sub.csv"), *extra]


def test_package_holds_settings_weights_blend_format_wheel_and_hashes(built):
    root = built / "packages/tiny"
    manifest = json.loads((root / "manifest.json").read_text())
    files = set(manifest["files"])
    wheel = [f for f in files if f.endswith(".whl")]
    assert wheel == [f"kaggle_image_pipeline-0.1.0+{provenance.code_hash()}-py3-none-any.whl"]
    assert manifest["code_hash"] == provenance.code_hash()
    assert {"package.json", "blend.json", "lenet5/settings.json", "lenet5/fold0.safetensors",
            "lenet5/fold1.safetensors", "lenet5b/fold1.safetensors"} <= files
    assert set(manifest["versions"]) >= {"python", "torch", "timm", "albumentations"}
    meta = json.loads((root / "package.json").read_text())
    assert meta["classes"] == ["class_0", "class_1", "class_2"]
    assert meta["submission"]["format"] == "proba" and meta["task"] == "multiclass"
    weights = json.loads((built / "runs/tiny/ensemble/weights.json").read_text())
    mix = json.loads((root / "blend.json").read_text())
    assert mix["weights"] == [weights["weights"][n] for n in mix["experiments"]]
    chosen = json.loads((built / "runs/tiny/lenet5b/scores.json").read_text())["tta_views"]
    settings = json.loads((root / "lenet5b/settings.json").read_text())
    assert settings["view_sets"] == [chosen] and settings["max_batch"] == 40
    names = zipfile.ZipFile(root / wheel[0]).namelist()
    assert "pipeline/infer.py" in names and not any(n.startswith("tests/") for n in names)


def test_infer_from_the_package_alone_is_byte_identical_to_make_submit(built, tmp_path):
    """Fresh folder: no data/tiny/train, configs or runs; the package's wheel installed alone."""
    root = fresh_copy(built, tmp_path)
    wheel = next((root / "pkg").glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                    "--target", str(root / "site"), str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": str(root / "site")}
    done = subprocess.run([sys.executable, "-m", "pipeline.infer", *args(root)], cwd=root, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "images/s" in done.stderr.splitlines()[-1]
    where = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"],
                           cwd=root, env=env, capture_output=True, text=True).stdout
    assert where.startswith(str(root / "site"))
    assert (root / "sub.csv").read_bytes() == (built / "submissions/tiny.csv").read_bytes()
    assert not (root / "configs").exists() and not (root / "runs").exists()


def test_a_stacked_package_infers_make_submits_bytes(built, tmp_path, monkeypatch):
    """mode: stack: blend.json carries the meta-model (coefficients, intercepts, strength) and
    infer applies it to the package's predictions, giving make submit's exact bytes."""
    work = tmp_path / "work"
    shutil.copytree(built, work, ignore=shutil.ignore_patterns("packages", "submissions"))
    monkeypatch.chdir(work)
    write_yaml(work / "configs/tiny/ensemble.yaml",
               {"competition": "competition.yaml", "experiments": list(EXPERIMENTS),
                "mode": "stack", "metric": "log_loss", "fallback_to_equal": False,
                "nested_cv": False})
    ensemble.main(["configs/tiny/ensemble.yaml"])
    submit.main(["configs/tiny/ensemble.yaml"])
    package.main(["configs/tiny/ensemble.yaml"])
    weights = json.loads((work / "runs/tiny/ensemble/weights.json").read_text())
    mix = json.loads((work / "packages/tiny/blend.json").read_text())
    assert mix["mode"] == "stack" and mix["stack"] == weights["stack"]
    assert mix["stack"]["model"] == "multinomial" and len(mix["stack"]["coef"][0]) == 3
    root = tmp_path / "fresh"
    shutil.copytree(work / "packages/tiny", root / "pkg")
    shutil.copytree(work / "data/tiny/test", root / "test")
    shutil.copy(work / "data/tiny/sample_submission.csv", root / "sample.csv")
    infer.main(args(root))
    assert (root / "sub.csv").read_bytes() == (work / "submissions/tiny.csv").read_bytes()


def test_estimate_prints_a_time_and_writes_nothing(built, tmp_path, capsys):
    root = fresh_copy(built, tmp_path)
    infer.main(args(root, "--estimate", "5000"))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("estimate: 5000 images would take about") and "images/s" in line
    assert not (root / "sub.csv").exists()


def test_infer_decodes_each_test_image_once_per_distinct_input(built, tmp_path, monkeypatch):
    """Two experiments reading the same 16 px input: every test image is decoded once, not once
    per experiment."""
    from pipeline.data import images
    root = fresh_copy(built, tmp_path)
    decoded = []
    real = images.decode
    monkeypatch.setattr(images, "decode", lambda path, channels=3: decoded.append(path) or
                        real(path, channels))
    infer.main(args(root))
    pkg = reader.load_package(root / "pkg")
    assert list(reader.by_input(pkg).values()) == [["lenet5", "lenet5b"]]
    assert sorted(decoded) == sorted(str(p) for p in (root / "test").iterdir())


def test_infer_refuses_code_other_than_the_packages(built, tmp_path, capsys, monkeypatch):
    """pip may keep another version of the code as "already satisfied": infer compares."""
    root = fresh_copy(built, tmp_path)
    monkeypatch.setattr(provenance, "code_hash", lambda: "0123456789abcdef")
    message = refuses(root, capsys)
    assert "built with pipeline code" in message and "the code running is 0123456789abcdef" in message
    assert "--force-reinstall" in message


def refuses(root: Path, capsys, *extra: str) -> str:
    with pytest.raises(SystemExit) as exc:
        infer.main(args(root, *extra))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not (root / "sub.csv").exists()
    return err[0]


def test_refuses_a_tampered_weight_file(built, tmp_path, capsys):
    root = fresh_copy(built, tmp_path)
    weights = root / "pkg/lenet5/fold1.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert "lenet5/fold1.safetensors: differs from the sha256" in refuses(root, capsys)


def test_refuses_a_missing_file(built, tmp_path, capsys):
    root = fresh_copy(built, tmp_path)
    (root / "pkg/lenet5b/settings.json").unlink()
    assert "lenet5b/settings.json: missing from the package" in refuses(root, capsys)


def test_refuses_an_unreadable_test_image(built, tmp_path, capsys):
    root = fresh_copy(built, tmp_path)
    (root / "test/te003.png").write_bytes(b"not a png at all")
    assert "te003.png: cannot decode image" in refuses(root, capsys)


def test_refuses_a_missing_test_image(built, tmp_path, capsys):
    root = fresh_copy(built, tmp_path)
    (root / "test/te001.png").unlink()
    assert "no image file for id 'te001'" in refuses(root, capsys)


def test_half_precision_weights_load_back_as_float32(built, tmp_path):
    src = built / "runs/tiny/lenet5/fold0/best.safetensors"
    inference.save_weights(src, tmp_path / "half.safetensors", half=True)
    assert (tmp_path / "half.safetensors").stat().st_size < 0.6 * src.stat().st_size
    full, half = inference.load_weights(src), inference.load_weights(tmp_path / "half.safetensors")
    assert all(half[k].dtype == full[k].dtype for k in full)
    for k in full:
        torch.testing.assert_close(half[k], full[k], atol=1e-2, rtol=1e-3)


def test_a_rebuild_replaces_the_package_only_when_complete(built, monkeypatch):
    monkeypatch.chdir(built)
    before = (built / "packages/tiny/manifest.json").read_bytes()
    monkeypatch.setattr(package_build, "build_wheel", lambda dest: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        package.main(["configs/tiny/ensemble.yaml"])
    assert (built / "packages/tiny/manifest.json").read_bytes() == before
    assert [p.name for p in (built / "packages").iterdir()] == ["tiny"]


def test_as_written_matches_the_csv_round_trip(tmp_path):
    values = np.random.default_rng(0).dirichlet(np.ones(4), size=200)
    write_csv(pd.DataFrame(values, columns=list("abcd")), tmp_path / "p.csv")
    read = pd.read_csv(tmp_path / "p.csv", keep_default_na=False).to_numpy(np.float64)
    assert np.array_equal(as_written(values), read)


@pytest.mark.parametrize("module", [package, infer])
def test_commands_have_help(module, capsys):
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    assert exc.value.code == 0 and "usage:" in capsys.readouterr().out


def test_refuses_a_sample_submission_of_another_layout(built, tmp_path, capsys):
    root = fresh_copy(built, tmp_path)
    sample = pd.read_csv(root / "sample.csv")
    sample.drop(columns="class_2").to_csv(root / "sample.csv", index=False)
    assert "differ from the competition's" in refuses(root, capsys)
