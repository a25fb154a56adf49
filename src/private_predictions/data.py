"""MNIST, loaded from the copy shipped in ``data/`` and checked against its checksum."""
import hashlib
from pathlib import Path

import numpy as np

from .paths import DATA_DIR

MNIST_PATH = DATA_DIR / "mnist.npz"
MNIST_SHA256 = "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64"
IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


class DatasetError(RuntimeError):
    """The MNIST file is missing or not the canonical one."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _raw_mnist(path: Path = MNIST_PATH, splits=("train", "test")):
    """``(x, y)`` of each split named, as uint8 images and labels; only those splits are read."""
    if path.exists():
        actual = sha256_of(path)
        if actual != MNIST_SHA256:
            raise DatasetError(
                f"{path} has SHA-256 {actual}, expected {MNIST_SHA256}. The file is "
                "damaged or not canonical MNIST: restore it with `git checkout -- data/`."
            )
        with np.load(path) as f:  # an .npz reads an array when it is asked for, not before
            return tuple((f[f"x_{split}"], f[f"y_{split}"]) for split in splits)
    # Keras checks its own download against a known hash.
    from ._tf import tf

    try:
        train, test = tf.keras.datasets.mnist.load_data()
    except Exception as error:  # network errors come in many types
        raise DatasetError(
            f"{path} is missing and Keras could not download MNIST ({error}). "
            "Restore the file with `git checkout -- data/mnist.npz`."
        ) from error
    return tuple({"train": train, "test": test}[split] for split in splits)


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 images of shape (n, 28, 28) -> float32 in [0, 1] of shape (n, 28, 28, 1)."""
    return (images.astype("float32") / 255.0).reshape((-1,) + IMAGE_SHAPE)


def load_mnist(path: Path = MNIST_PATH):
    """Return ``(x_train, y_train), (x_test, y_test)`` ready for the model.

    Images are float32 in [0, 1] with shape (n, 28, 28, 1); labels are integers 0-9.
    """
    return tuple((to_model_input(x), y.astype("int64")) for x, y in _raw_mnist(path))


def load_mnist_test(path: Path = MNIST_PATH):
    """Return ``(x_test, y_test)`` only, as :func:`load_mnist` does.

    For what never trains (a client, the benchmark): the 60,000 training images are never read, where
    loading them took about 230 MB more of the process's memory at its peak.
    """
    ((x_test, y_test),) = _raw_mnist(path, splits=("test",))
    return to_model_input(x_test), y_test.astype("int64")
