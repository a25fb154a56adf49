"""The servers' network (network.py) computes what the Keras model computes, for other layouts too."""
import numpy as np
import pytest

from private_predictions import connect
from private_predictions._tf import tf
from private_predictions.serving import secret_network


@pytest.fixture(scope="module")
def protocol(cluster):
    return connect(cluster.config)


def small_model():
    """Fused ReLUs, pooling over an odd size (Keras drops the last row), a 2 x 2 x 4 flatten, a layer
    without bias."""
    tf.keras.utils.set_random_seed(3)
    model = tf.keras.Sequential([
        tf.keras.layers.Conv2D(4, 3, activation="relu", input_shape=(11, 11, 1)),
        tf.keras.layers.AveragePooling2D(2),
        tf.keras.layers.Conv2D(4, 2),
        tf.keras.layers.AveragePooling2D(2),
        tf.keras.layers.Activation("relu"),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(6, activation="relu", use_bias=False),
        tf.keras.layers.Dense(3),
    ])
    model.set_weights([weights + 0.05 for weights in model.get_weights()])  # biases off zero too
    return model


def test_the_servers_network_matches_keras(protocol):
    model = small_model()
    images = np.random.default_rng(4).random((5, 11, 11, 1))
    network, _, divisor = secret_network(model, protocol)
    assert divisor == 1

    @tf.function
    def private(batch):
        return network(protocol.define_private_input("server0", lambda: batch)).reveal().to_native()

    np.testing.assert_allclose(private(tf.constant(images)).numpy(), model(images).numpy(), atol=2e-3)
    # The division of average pooling moved into the next weighted layer's weights, which the
    # servers hold as shares of round(w * scale): the second convolution's are a quarter.
    share0, share1 = network.kernel_shares(2)
    np.testing.assert_allclose((share0 + share1) / network.scale, model.layers[2].get_weights()[0] / 4,
                               atol=1 / network.scale)


def test_pooling_with_overlapping_windows_is_refused_before_anything_is_shared(protocol):
    model = tf.keras.Sequential([tf.keras.layers.Conv2D(2, 3, input_shape=(8, 8, 1)),
                                 tf.keras.layers.AveragePooling2D(3, strides=1),
                                 tf.keras.layers.Flatten(), tf.keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="non-overlapping windows"):
        secret_network(model, protocol)
