"""A stand-in for torchvision's datasets and transforms, for running PEDL's published examples here.

PyPI's torchvision does not import beside the CPU build of torch these machines use, and the examples'
data (MNIST, CIFAR-10) is downloaded from the internet, which they cannot reach. This package gives the
examples' data.py what it calls — `datasets.MNIST`, `datasets.CIFAR10`, `transforms.Compose`, `ToTensor`,
`Normalize`, `utils.make_grid` — over scikit-learn's handwritten digits, shaped as MNIST (28x28, one
channel) or CIFAR-10 (32x32, three channels). The examples' code runs unchanged; their accuracy is on
digits, not MNIST/CIFAR.
"""

from . import datasets, transforms, utils

__version__ = "0.0-standin"
__all__ = ["datasets", "transforms", "utils"]
