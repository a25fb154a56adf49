"""The one definition of the tutorial's network, used by every notebook and test."""
from pathlib import Path

from ._tf import tf
from .data import IMAGE_SHAPE, NUM_CLASSES
from .paths import MODEL_PATH


def short_conv_mnist(with_softmax: bool = True) -> "tf.keras.Sequential":
    """Three 3x3 convolutions, each followed by 2x2 average pooling and ReLU, then a dense layer.

    Average pooling instead of max pooling, and nothing but ReLU as a non-linearity,
    keep the network cheap to evaluate on secret-shared values. Without the softmax
    the model returns logits, which is what the servers compute: the softmax is
    cheap for the client to apply on its own.
    """
    layers = tf.keras.layers
    model = tf.keras.Sequential(name="short_conv_mnist")
    for filters in (10, 32, 64):
        # input_shape on the first layer, not an InputLayer: tfe's clone_model skips
        # InputLayers and needs the shape on the first real layer.
        shape = {"input_shape": IMAGE_SHAPE} if filters == 10 else {}
        model.add(layers.Conv2D(filters, (3, 3), **shape))
        model.add(layers.AveragePooling2D((2, 2)))
        model.add(layers.Activation("relu"))
    model.add(layers.Flatten())
    model.add(layers.Dense(NUM_CLASSES, activation="softmax" if with_softmax else None))
    return model


def compile_for_training(model):
    model.compile(
        loss="sparse_categorical_crossentropy",
        optimizer=tf.keras.optimizers.Adam(),
        metrics=["accuracy"],
    )
    return model


def load_logits_model(path: Path = MODEL_PATH):
    """The trained network without its softmax, ready to be secret-shared."""
    if not Path(path).exists():
        raise FileNotFoundError(
            f"No trained model at {path}. Run notebooks/01_public_training.ipynb first, "
            "or restore the committed one with `git checkout -- models/`."
        )
    trained = tf.keras.models.load_model(path)
    logits_model = short_conv_mnist(with_softmax=False)
    logits_model.set_weights(trained.get_weights())
    return logits_model
