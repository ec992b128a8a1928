"""The `flareseg` command with bad inputs and user mistakes: one line naming the file and the reason, never a
traceback, nothing else lost; exit status 1 when some case failed, 2 for a usage error, 130 when interrupted."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from flareseg import cli
from flareseg.cli import main, run_stage
from flareseg.data.phantom import make_phantom
from flareseg.io import Geometry, write_image

REPO = Path(__file__).resolve().parents[1]
GEOMETRY = Geometry(spacing=(2.0, 1.5, 1.5), origin=(0.0,) * 3, direction=tuple(np.eye(3).ravel()), shape=(5, 6, 7))


def _predict(checkpoints, input_dir: Path, output_dir: Path) -> int:
    coarse, fine = checkpoints
    argv = ["predict", "-i", str(input_dir), "-o", str(output_dir), "--coarse", str(coarse), "--fine", str(fine)]
    return main([*argv, "-q"])


def _phantom(path: Path, seed: int = 1) -> Path:
    phantom = make_phantom(seed, shape=(20, 28, 28), orientation="identity")
    return write_image(path, phantom.image, phantom.geometry)


def _rows(out: Path) -> dict[str, dict]:
    return {row["case"]: row for row in csv.DictReader(open(out / "timing.csv"))}


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- fault 8: one bad case no longer stops the batch --------------------------------------------------------------


def test_two_images_of_one_case_and_a_broken_link_fail_alone(checkpoints, tmp_path, capsys):
    inputs = tmp_path / "in"
    _phantom(inputs / "a_0000.nii.gz")
    _phantom(inputs / "a_0000.mha")
    _phantom(inputs / "good_0000.nii.gz")
    (inputs / "gone_0000.nii.gz").symlink_to(tmp_path / "moved_0000.nii.gz")
    assert _predict(checkpoints, inputs, tmp_path / "out") == 1
    err = capsys.readouterr().err.splitlines()
    both = [line for line in err if "a_0000.nii.gz" in line and "a_0000.mha" in line]
    assert len(both) == 1 and "2 images for case 'a'" in both[0], err
    broken = [line for line in err if "gone_0000.nii.gz" in line]
    target = tmp_path / "moved_0000.nii.gz"
    assert broken == [f"failed: {inputs / 'gone_0000.nii.gz'}: broken symbolic link to {target}"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii*")) == ["good.nii.gz"]
    rows = _rows(tmp_path / "out")
    assert {case: row["status"] for case, row in rows.items()} == {"a": "failed", "gone": "failed", "good": "ok"}
    assert "a_0000.mha" in rows["a"]["message"] and "broken symbolic link" in rows["gone"]["message"]


def test_output_folder_equal_to_the_input_folder_is_refused(tmp_path, capsys):
    image = _phantom(tmp_path / "in" / "a_0000.nii.gz")
    (tmp_path / "link").symlink_to(tmp_path / "in")
    for output in (tmp_path / "in", tmp_path / "link"):  # the same folder under another name too
        assert main(["predict", "-i", str(tmp_path / "in"), "-o", str(output), "-q"]) == 2
        assert "is the input folder" in _one_line(capsys.readouterr().err)
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["a_0000.nii.gz"] and image.is_file()


def test_a_rerun_beside_earlier_outputs_segments_only_the_images(checkpoints, tmp_path, caplog):
    inputs = tmp_path / "in"
    _phantom(inputs / "a_0000.nii.gz")
    write_image(inputs / "a.nii.gz", np.zeros(GEOMETRY.shape, np.uint8), GEOMETRY)  # an earlier run's output
    before = (inputs / "a.nii.gz").read_bytes()
    assert _predict(checkpoints, inputs, inputs / "predictions") == 0
    assert (inputs / "a.nii.gz").read_bytes() == before  # an earlier output beside the images is not an image
    assert sorted(p.name for p in (inputs / "predictions").glob("*.nii*")) == ["a.nii.gz"]
    assert list(_rows(inputs / "predictions")) == ["a"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"ignored {inputs / 'a.nii.gz'}: not named <case>_0000.<ext>"]  # predictions/: no warning


def test_a_prediction_never_replaces_an_input_image(checkpoints, tmp_path, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    image = _phantom(out / "a.nii.gz")  # e.g. a CT kept under the name its prediction will have
    inputs.mkdir()
    (inputs / "a_0000.nii.gz").symlink_to(image)  # writing a's prediction would replace its own input
    _phantom(inputs / "b_0000.nii.gz", seed=2)
    before = image.read_bytes()
    assert _predict(checkpoints, inputs, out) == 1
    line = _one_line("\n".join(line for line in capsys.readouterr().err.splitlines() if "a_0000" in line))
    assert "would overwrite an input image" in line
    assert image.read_bytes() == before and (out / "b.nii.gz").is_file()


# --- fault 9: leftovers of killed writers -------------------------------------------------------------------------


def test_predict_removes_temporaries_of_dead_writers_only(checkpoints, tmp_path):
    _phantom(tmp_path / "in" / "a_0000.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = out / f".a.nii.gz.tmp-{dead_pid}-0123abcd.nii.gz"
        busy = out / f".b.nii.gz.tmp-{live.pid}-89abcdef.nii.gz"
        stale.write_bytes(b"half a file")
        busy.write_bytes(b"being written")
        assert _predict(checkpoints, tmp_path / "in", out) == 0
        assert not stale.exists() and busy.exists() and (out / "a.nii.gz").is_file()
    finally:
        live.kill()
        live.wait()


# --- fault 13: folders without images, files that do not follow the naming ----------------------------------------


def test_input_folder_without_images_is_a_usage_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", "-i", str(empty), "-o", str(tmp_path / "out"), "-q"]) == 2
    assert "the folder is empty" in _one_line(capsys.readouterr().err)
    misnamed = tmp_path / "misnamed"
    _phantom(misnamed / "scan.nii.gz")
    assert main(["predict", "-i", str(misnamed), "-o", str(tmp_path / "out"), "-q"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "no image found" in line and "1 image file not named <case>_0000.<ext> (scan.nii.gz)" in line
    assert not (tmp_path / "out" / "timing.csv").exists()  # never "predicted 0, failed 0"


def test_a_dicom_series_folder_given_itself(shared_data, tmp_path, capsys):
    series = shared_data / "ct_dicom_20sl" / "dicom"
    assert main(["predict", "-i", str(series), "-o", str(tmp_path / "out"), "-q"]) == 2
    assert "pass its parent folder" in _one_line(capsys.readouterr().err)


# --- fault 12: one line for every user mistake, a last-resort line for the rest -----------------------------------


def _mistakes(tmp_path: Path) -> list[tuple[list[str], str]]:
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    image = write_image(tmp_path / "ct_0000.nii.gz", np.zeros(GEOMETRY.shape, np.int16), GEOMETRY)
    label = write_image(tmp_path / "labels" / "ct.nii.gz", np.zeros(GEOMETRY.shape, np.uint8), GEOMETRY)
    folder, missing = tmp_path / "empty", tmp_path / "missing"
    folder.mkdir()
    images = image.parent
    t, i, lab, f, m = str(text), str(image), str(label), str(folder), str(missing)
    png = str(tmp_path / "x.png")
    return [
        (["overlay", "--image", t, "--label", lab, "-o", png], "cannot be read as an image"),
        (["overlay", "--image", m, "--label", lab, "-o", png], "no such file"),
        (["overlay", "--image", f, "--label", lab, "-o", png], "without a readable DICOM series"),
        (["overlay", "--image", i, "--label", t, "-o", png], "cannot be read as an image"),
        (["overlay", "--image", i, "--label", lab, "-o", f], "is a folder"),
        (["overlay", "--image", i, "--label", lab, "-o", str(tmp_path / "x.txt")], "not a picture file name"),
        (["predict", "-i", m, "-o", str(tmp_path / "out")], "no such folder"),
        (["predict", "-i", i, "-o", str(tmp_path / "out")], "pass the folder that holds it"),
        (["predict", "-i", str(images), "-o", t], "the output must be a folder"),
        (["predict", "-i", str(images), "-o", str(tmp_path / "o"), "--coarse", m, "--fine", m], "does not exist"),
        (["predict", "-i", str(images), "-o", str(tmp_path / "o"), "--coarse", t, "--fine", t], "checkpoint"),
        (["predict", "-i", str(images), "-o", str(tmp_path / "o"), "--coarse", f, "--fine", f], "is a folder"),
        (["prepare", "-i", m, "-o", str(tmp_path / "p")], "no such folder"),
        (["prepare", "-i", f, "-o", str(tmp_path / "p")], "the folder is empty"),
        (["prepare", "-i", str(images), "-l", m, "-o", str(tmp_path / "p")], "no such folder"),
        (["prepare", "-i", str(images), "-o", str(tmp_path / "p"), "--config", m], "cannot read config file"),
        (["prepare", "-i", str(images), "-o", str(tmp_path / "p"), "--config", t], "config error"),
        (["phantoms", "-o", t, "-n", "1", "--shape", "8", "8", "8"], "notes.txt"),
        (["train", "--set", f"train.out={tmp_path / 'run'}", "--set", f"train.data={m}"], "run `flareseg prepare`"),
        (["pseudo-label", "-i", f, "-l", f, "-o", str(tmp_path / "pl")], "the folder is empty"),
        (["pseudo-label", "-i", str(images), "-l", f, "-o", str(tmp_path / "pl"), "--annotated", t], "annotated"),
        (["evaluate", "--gt", m, "--pred", f, "--out", str(tmp_path / "s.csv")], "no such folder"),
        (["evaluate", "--gt", f, "--pred", f, "--out", str(tmp_path / "s.csv")], "no label maps"),
        (["evaluate", "--gt", str(label.parent), "--pred", f, "--out", f], "is a folder"),
        (["select-unlabeled", "-i", f, "-o", str(tmp_path / "s.json"), "--intermediate", m], "the folder is empty"),
        (["select-unlabeled", "-i", str(images), "-o", str(tmp_path / "s.json"), "--intermediate", m], "checkpoint"),
        (["select-unlabeled", "-i", str(images), "-o", f, "--intermediate", m], "is a folder"),
        (["summary", "--device", "gpu"], "unknown device 'gpu'"),
        (["train", "--device", "gpu", "--set", f"train.out={tmp_path / 'run'}"], "unknown device 'gpu'"),
        (["summary", "--set", "model.name=nope"], "unknown model"),
        (["export", "-o", str(tmp_path / "e"), "--weights", m], "missing"),
        (["export", "-o", str(tmp_path / "e"), "--weights", f], "empty"),
        (["demo", "--out", t], "not a flareseg demo folder"),
        (["config", "--config", m], "cannot read config file"),
        (["config", "--set", "nope=1"], "unknown config key"),
    ]


def test_user_mistakes_get_one_line_and_exit_status_2(tmp_path, capsys):
    failures = []
    for argv, expected in _mistakes(tmp_path):
        status = main(argv)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("WARNING")]
        if status != 2 or len(lines) != 1 or expected not in lines[0] or "Traceback" in err:
            failures.append((argv[0], status, expected, err))
    assert failures == []


def _fail_with(monkeypatch, error: BaseException) -> None:
    def run(args):
        raise error

    monkeypatch.setattr(cli, "_run_show_config", run)


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    _fail_with(monkeypatch, RuntimeError("the network said no\nsecond line"))
    monkeypatch.delenv("FLARESEG_DEBUG", raising=False)
    assert main(["config"]) == 1
    assert _one_line(capsys.readouterr().err) == (
        "flareseg config: unexpected error: RuntimeError: the network said no second line "
        "(rerun with --debug for the traceback)"
    )
    for argv in (["--debug", "config"], ["config", "--debug"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("Traceback") and "RuntimeError: the network said no" in err
    monkeypatch.setenv("FLARESEG_DEBUG", "1")
    assert main(["config"]) == 1
    assert capsys.readouterr().err.startswith("Traceback")


def test_debug_reaches_the_stage_scripts(monkeypatch, capsys):
    _fail_with(monkeypatch, ValueError("a user's mistake"))
    monkeypatch.delenv("FLARESEG_DEBUG", raising=False)
    assert run_stage("config", REPO / "configs" / "coarse.yaml", ["--debug"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.splitlines()[-1] == "flareseg config: a user's mistake"


def test_interrupt_is_one_line_with_status_130(monkeypatch, capsys):
    _fail_with(monkeypatch, KeyboardInterrupt())
    monkeypatch.delenv("FLARESEG_DEBUG", raising=False)
    assert main(["config"]) == 130
    assert _one_line(capsys.readouterr().err) == "flareseg config: interrupted"


def test_the_installed_command_prints_no_traceback(tmp_path):
    """The real entry point, in a fresh process: exit status and stderr as a user sees them."""
    (tmp_path / "notes.txt").write_text("not an image\n")
    argv = ["overlay", "--image", str(tmp_path / "notes.txt"), "--label", str(tmp_path / "notes.txt")]
    env = {key: value for key, value in os.environ.items() if key != "FLARESEG_DEBUG"}
    command = [sys.executable, "-m", "flareseg", *argv, "-o", str(tmp_path / "x.png")]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "cannot be read as an image" in _one_line(result.stderr)
