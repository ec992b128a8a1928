from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="flareseg",
    version="0.1.0",
    description="Fast coarse-to-fine abdominal CT organ and tumor segmentation in PyTorch (FLARE-style).",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["flareseg", "flareseg.*"]),
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "SimpleITK>=2.2",
        "scipy>=1.10",
        "lmdb>=1.4",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",  # training curves (and, later, overlay images)
    ],
    extras_require={
        "onnx": ["onnx>=1.16", "onnxscript>=0.3", "onnxruntime>=1.18"],
        "openvino": ["openvino>=2025.0", "onnx>=1.16", "onnxscript>=0.3"],
        "dicom": ["highdicom>=0.22", "rt-utils>=1.2.7"],  # DICOM-SEG and RTSTRUCT outputs
        "int8": ["nncf>=2.14", "openvino>=2025.0", "onnx>=1.16", "onnxscript>=0.3"],  # predict.precision: int8
        "test": [
            "pytest>=7",
            "surface-distance>=0.1",
            "onnx>=1.16",
            "onnxscript>=0.3",
            "onnxruntime>=1.18",
            "openvino>=2025.0",
            "nncf>=2.14",
            "highdicom>=0.22",
            "rt-utils>=1.2.7",
        ],
        "dev": ["pytest>=7", "ruff>=0.5", "onnx>=1.16", "onnxscript>=0.3", "onnxruntime>=1.18"],
    },
    entry_points={"console_scripts": ["flareseg=flareseg.cli:main"]},
)
