"""Deep Belief Network (Hinton et al. 2006) trainer: RBM pre-training, fine-tuning,
MNIST data handling, the Avro model file and simple PNG plots.

Nothing here depends on ``iterreduce`` except :mod:`dbn.distributed`.
"""

from .model import Model, load, save

__all__ = ["Model", "load", "save"]
