"""b2kd: black-box knowledge distillation from the cloud to the edge."""

__version__ = "0.3.0"
