"""Classifiers (each owning its input normalisation), the GAN, the model registry, and loading them."""

# Importing the architecture modules registers them in ``MODELS``.
from . import lenet, mobilenet, resnet, vgg  # noqa: F401
from .gan import Discriminator, Generator, from_uint8, quantize_uint8, to_unit
from .load import load_classifier, load_generator
from .normalize import Classifier
from .registry import MODELS, available_models, build_model, count_parameters, register

__all__ = [
    "MODELS",
    "Classifier",
    "Discriminator",
    "Generator",
    "available_models",
    "build_model",
    "count_parameters",
    "from_uint8",
    "load_classifier",
    "load_generator",
    "quantize_uint8",
    "register",
    "to_unit",
]
