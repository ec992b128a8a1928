"""Start-up of `flareseg predict`: what a process has imported when it starts reading its first image.

Counted in modules, never in seconds (this machine is shared and noisy); bench/bench_startup.py measures the time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from flareseg.config import load_config
from flareseg.data.phantom import make_phantom
from flareseg.io import write_image

# What prediction imports only when it needs it, never on the way to reading the first image. Each costs from tens of
# milliseconds (matplotlib, highdicom) to seconds (torch._dynamo, which pulls in sympy and torch.onnx: 2-3 s here).
HEAVY = {
    "matplotlib": "overlay pictures (predict.png): when the first one is drawn",
    "highdicom": "DICOM-SEG outputs: when the first one is written",
    "pydicom": "DICOM-SEG and RTSTRUCT outputs: when the first one is written",
    "rt_utils": "RTSTRUCT outputs: when the first one is written",
    "onnx": "the ONNX export: only when the export cache has none",
    "onnxscript": "the ONNX export: only when the export cache has none",
    "onnx_ir": "the ONNX export: only when the export cache has none",
    "onnxruntime": "never used by prediction",
    "torch.onnx": "the ONNX export: only when the export cache has none",
    "torch._dynamo": "torch's compiler: nothing on the prediction path compiles",
    "torch._inductor": "torch's compiler: nothing on the prediction path compiles",
    "sympy": "torch's compiler (symbolic shapes)",
    "nncf": "int8 quantization (flareseg quantize)",
    "tensorboard": "training",
    "lmdb": "prepared data (training)",
    "flareseg.engine": "training",
    "flareseg.evaluation": "flareseg evaluate",
    "flareseg.planning": "flareseg plan",
    "flareseg.semi": "semi-supervised training and pseudo-labels",
    "flareseg.visualize": "overlay pictures (predict.png): when the first one is drawn",
    "flareseg.io.dicom_outputs": "DICOM-SEG and RTSTRUCT outputs: when the first one is written",
    "flareseg.inference.statistics": "predict.statistics: when the first case's figures are computed",
}

# `flareseg ARGS` in a fresh process that writes the names of its imported modules to MODULES_FILE and exits at the
# first open of an input image (`<case>_0000.nii.gz`: read_image checks the NIfTI header before ITK reads it). The
# audit hook is installed before anything of flareseg is imported; its own open (of MODULES_FILE) does not match.
STOP_AT_READ = """
import json, os, sys

def stop_at_read(event, args):
    if event == "open" and isinstance(args[0], str) and args[0].endswith("_0000.nii.gz"):
        with open(os.environ["MODULES_FILE"], "w") as out:
            json.dump(sorted(sys.modules), out)
        os._exit(0)

sys.addaudithook(stop_at_read)
from flareseg.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _imported_by(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code`."""
    done = subprocess.run(
        [sys.executable, "-c", f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def _heavy(modules: set[str]) -> dict[str, str]:
    return {name: HEAVY[name] for name in sorted(modules & HEAVY.keys())}


def test_the_command_line_and_the_predict_path_import_no_heavy_module():
    """`import flareseg.cli` (what `flareseg --help` and `show-config` pay) loads neither torch nor numpy; the
    OpenVINO compile settings (what bench_startup.py's torch-free floor loads the compiled networks with) load no
    torch; the modules the predict command imports load none of HEAVY."""
    cli = _imported_by("import flareseg.cli")
    assert "flareseg.cli" in cli
    assert sorted(cli & {"torch", "numpy", "scipy", "SimpleITK", "openvino"}) == []
    settings = _imported_by("import flareseg.inference.openvino_settings")
    assert "flareseg.inference.openvino_settings" in settings and "torch" not in settings
    predict = _imported_by("import flareseg.cli\nimport flareseg.inference.batch")
    assert "torch" in predict and "flareseg.inference.batch" in predict
    assert _heavy(predict) == {}


def test_predict_reads_its_first_image_without_heavy_modules(checkpoints, tmp_path):
    """A whole `flareseg predict` process, with the export (and compiled-network) cache filled as after a first run,
    has imported none of HEAVY when it starts reading its image: no exporter, no compiler, no plotting."""
    from flareseg.inference.predictor import Predictor

    coarse, fine = checkpoints
    phantom = make_phantom(0, shape=(24, 40, 40), spacing=(5.0, 4.0, 4.0), orientation="ras")
    write_image(tmp_path / "in" / "ct_0000.nii.gz", phantom.image, phantom.geometry)
    Predictor(load_config(None, [f"predict.coarse={coarse}", f"predict.fine={fine}"]).predict)  # fills the caches
    modules_file = tmp_path / "modules.json"
    command = ["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-q"]
    command += ["--coarse", str(coarse), "--fine", str(fine)]
    env = {**os.environ, "MODULES_FILE": str(modules_file)}
    done = subprocess.run(
        [sys.executable, "-c", STOP_AT_READ, *command], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr
    assert modules_file.is_file(), "the process never opened its image (read_image no longer opens NIfTI in Python?)"
    modules = set(json.loads(modules_file.read_text()))
    assert "flareseg.stage" in modules  # the networks were loaded before the read: the check covers loading them
    assert _heavy(modules) == {}
