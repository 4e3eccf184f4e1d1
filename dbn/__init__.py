"""Deep Belief Network (Hinton et al. 2006) trainer: RBM pre-training, fine-tuning,
MNIST data handling, the Avro model file and simple PNG plots.

The training code (:mod:`dbn.rbm`, :mod:`dbn.network`) needs numpy only; the data and
model files use :mod:`iterreduce.fs` (record errors, JSON), and :mod:`dbn.distributed`
is the iterreduce algorithm.
"""

from .model import Model, load, save

__all__ = ["Model", "load", "save"]
