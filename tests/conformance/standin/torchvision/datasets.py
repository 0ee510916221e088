"""MNIST and CIFAR10 with torchvision's constructor arguments, over scikit-learn's digits (1797 images).

The first 1500 images are the training split, the other 297 the test split. MNIST reads
ROOT/MNIST/standin-mnist.npz (what the conformance runner puts in the examples' download archive);
CIFAR10(download=True) writes ROOT/cifar-10-standin.npz, as torchvision's would download the real set.
"""

import os

import numpy as np

TRAIN = 1500


def digit_images(scale, pad, channels):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.kron(digits.images, np.ones((scale, scale))) * (255.0 / 16.0)
    images = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    if channels == 3:  # a tint per class, so that colour carries a little signal, as in CIFAR
        tint = np.stack([0.6 + 0.4 * np.cos(digits.target + k) for k in range(3)], axis=1)
        images = images[:, :, :, None] * tint[:, None, None, :]
    return images.clip(0, 255).astype(np.uint8), digits.target.astype(np.int64)


def write_mnist(path):
    images, labels = digit_images(scale=3, pad=2, channels=1)  # 8x8 -> 28x28
    np.savez(path, images=images, labels=labels)


class _Split:
    def __init__(self, path, train, transform, target_transform):
        with np.load(path) as data:
            images, labels = data["images"], data["labels"]
        part = slice(0, TRAIN) if train else slice(TRAIN, None)
        self.data, self.targets = images[part], labels[part]
        self.transform, self.target_transform = transform, target_transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image, target = self.data[index], int(self.targets[index])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


class MNIST(_Split):
    def __init__(self, root, train=True, transform=None, target_transform=None, download=False):
        path = os.path.join(root, "MNIST", "standin-mnist.npz")
        if download and not os.path.exists(path):  # as torchvision's would download the real set
            os.makedirs(os.path.dirname(path), exist_ok=True)
            partial = f"{path}.{os.getpid()}.partial.npz"
            write_mnist(partial)
            os.replace(partial, path)
        if not os.path.exists(path):
            raise RuntimeError(f"Dataset not found: {path}")
        super().__init__(path, train, transform, target_transform)


class CIFAR10(_Split):
    def __init__(self, root, train=True, transform=None, target_transform=None, download=False):
        path = os.path.join(root, "cifar-10-standin.npz")
        if download and not os.path.exists(path):
            os.makedirs(root, exist_ok=True)
            images, labels = digit_images(scale=4, pad=0, channels=3)  # 8x8 -> 32x32 RGB
            partial = f"{path}.{os.getpid()}.partial.npz"
            np.savez(partial, images=images, labels=labels)
            os.replace(partial, path)
        if not os.path.exists(path):
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        super().__init__(path, train, transform, target_transform)
