"""Inference: coarse model -> organ box -> fine model -> post-processing -> the input's exact geometry.

Uses io, the shared preprocessing functions, the models and checkpoints; never the trainer. `Predictor`
(flareseg.inference.predictor) is imported when first named, so that a torch-free module of this package
(openvino_settings) can be imported without torch.
"""

__all__ = ["Predictor"]


def __getattr__(name: str):
    if name == "Predictor":
        from flareseg.inference.predictor import Predictor

        return Predictor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
