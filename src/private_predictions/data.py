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


def _raw_mnist(path: Path = MNIST_PATH):
    if path.exists():
        actual = sha256_of(path)
        if actual != MNIST_SHA256:
            raise DatasetError(
                f"{path} has SHA-256 {actual}, expected {MNIST_SHA256}. The file is "
                "damaged or not canonical MNIST: restore it with `git checkout -- data/`."
            )
        with np.load(path) as f:
            return (f["x_train"], f["y_train"]), (f["x_test"], f["y_test"])
    # Keras checks its own download against a known hash.
    from ._tf import tf

    try:
        return tf.keras.datasets.mnist.load_data()
    except Exception as error:  # network errors come in many types
        raise DatasetError(
            f"{path} is missing and Keras could not download MNIST ({error}). "
            "Restore the file with `git checkout -- data/mnist.npz`."
        ) from error


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 images of shape (n, 28, 28) -> float32 in [0, 1] of shape (n, 28, 28, 1)."""
    return (images.astype("float32") / 255.0).reshape((-1,) + IMAGE_SHAPE)


def load_mnist(path: Path = MNIST_PATH):
    """Return ``(x_train, y_train), (x_test, y_test)`` ready for the model.

    Images are float32 in [0, 1] with shape (n, 28, 28, 1); labels are integers 0-9.
    """
    (x_train, y_train), (x_test, y_test) = _raw_mnist(path)
    return (
        (to_model_input(x_train), y_train.astype("int64")),
        (to_model_input(x_test), y_test.astype("int64")),
    )
