"""Inference: coarse model -> organ box -> fine model -> post-processing -> the input's exact geometry.

Uses io, the shared preprocessing functions, the models and checkpoints; never the trainer.
"""

from flareseg.inference.predictor import Predictor

__all__ = ["Predictor"]
