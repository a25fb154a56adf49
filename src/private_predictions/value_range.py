"""A proven bound on every value the network computes, for any input with pixels in [0, 1].

The servers compute on fixed-point numbers with a fixed integer part: a value that
leaves it is not just wrong, it also stops being hidden by tf-encrypted's interactive
truncation. Observing MNIST images proves nothing about what a client may send, so
before a model is shared its values are bounded by interval arithmetic: each layer
maps a box of possible inputs to a box containing all of its outputs (a lower and an
upper bound for every value), from the box [0, 1] of the input pixels onwards.
"""
from typing import List, Tuple

import numpy as np

from ._tf import tf


class ValueRangeError(ValueError):
    """The model can compute values that the fixed-point encoding cannot hold."""


def kernel_and_bias(layer):
    """A convolution's or dense layer's kernel and bias (zeros for a layer built with use_bias=False)."""
    kernel, *bias = layer.get_weights()
    return kernel, bias[0] if bias else np.zeros(kernel.shape[-1], kernel.dtype)


def _split(weights):
    return np.maximum(weights, 0), np.minimum(weights, 0)


def _conv(box, layer):
    low, high = box
    kernel, bias = kernel_and_bias(layer)
    positive, negative = _split(kernel)

    def conv(x, w):
        return tf.nn.conv2d(x, w, strides=layer.strides, padding=layer.padding.upper()).numpy()

    return conv(low, positive) + conv(high, negative) + bias, conv(high, positive) + conv(low, negative) + bias


def _dense(box, layer):
    low, high = box
    kernel, bias = kernel_and_bias(layer)
    positive, negative = _split(kernel)
    return low @ positive + high @ negative + bias, high @ positive + low @ negative + bias


def _average_pooling(box, layer):
    def pool(x):
        return tf.nn.avg_pool2d(x, layer.pool_size, layer.strides, layer.padding.upper()).numpy()

    return pool(box[0]), pool(box[1])


def _activation(box, name):
    if name == "relu":
        return np.maximum(box[0], 0), np.maximum(box[1], 0)
    if name == "linear":
        return box
    raise ValueRangeError(f"cannot bound the activation {name!r}: the servers run ReLU and linear layers only")


def servers_factors(keras_model) -> List[float]:
    """For each layer, how many times larger its outputs are on the servers than in Keras.

    The servers sum where Keras averages (network.py): from an average pooling layer to the next
    convolution or dense layer, whose weights are divided by the window's area instead, every
    value is that area times larger.
    """
    factors, factor = [], 1.0
    for layer in keras_model.layers:
        kind = type(layer).__name__
        if kind in ("Conv2D", "Dense"):
            factor = 1.0
        elif kind == "AveragePooling2D":
            factor *= float(np.prod(layer.pool_size))
        factors.append(factor)
    return factors


def bounds(keras_model, low: float = 0.0, high: float = 1.0) -> List[Tuple[str, float]]:
    """Each layer's name and the largest magnitude any of its outputs can reach on the servers,
    for inputs in [low, high]."""
    shape = (1,) + tuple(keras_model.input_shape[1:])
    box = (np.full(shape, low, np.float64), np.full(shape, high, np.float64))
    found = []
    for layer, factor in zip(keras_model.layers, servers_factors(keras_model)):
        kind = type(layer).__name__
        if kind == "Conv2D":
            box = _activation(_conv(box, layer), layer.get_config()["activation"])
        elif kind == "Dense":
            box = _activation(_dense(box, layer), layer.get_config()["activation"])
        elif kind == "AveragePooling2D":
            box = _average_pooling(box, layer)
        elif kind == "Activation":
            box = _activation(box, layer.get_config()["activation"])
        elif kind == "Flatten":
            box = (box[0].reshape(1, -1), box[1].reshape(1, -1))
        elif kind != "InputLayer":
            raise ValueRangeError(f"cannot bound layer {layer.name} ({kind}): no interval rule for it here")
        found.append((layer.name, factor * float(max(np.abs(box[0]).max(), np.abs(box[1]).max()))))
    return found


def check_fits(keras_model, limit: float) -> List[Tuple[str, float]]:
    """Raise ValueRangeError unless every value the model can compute stays below ``limit`` in magnitude."""
    found = bounds(keras_model)
    too_large = [(name, bound) for name, bound in found if bound >= limit]
    if too_large:
        name, bound = max(too_large, key=lambda item: item[1])
        raise ValueRangeError(
            f"This model can compute values up to {bound:.0f} in magnitude (layer {name}), but the "
            f"fixed-point encoding holds values below {limit:.0f} only, and a value outside it would "
            "no longer be hidden. Retrain with smaller weights (e.g. L2 regularisation) or fewer "
            "filters, or scale the inputs down.")
    return found


MAX_SCALE_DOWN = 4  # each halving of the values costs about a bit of the logits' precision


def scaled_down(keras_model, divisor: int):
    """The same network computing every value divided by ``divisor``.

    Convolutions, average pooling, ReLU and dense layers are positively homogeneous: with the
    first layer's weights and every bias divided by ``divisor``, every value inside the network
    is divided by it too, and the logits are exactly the original ones over ``divisor``.
    """
    copy = tf.keras.Sequential.from_config(keras_model.get_config())
    weights, first = [], True
    for layer in keras_model.layers:
        values = layer.get_weights()
        if values:  # a kernel, and a bias unless the layer has none
            kernel, *bias = values
            values = [kernel / divisor if first else kernel] + [b / divisor for b in bias]
            first = False
        weights += values
    copy.set_weights(weights)
    return copy


def fitting(keras_model, limit: float):
    """(the model to compute, the divisor of its values, the proven bound of the original model).

    A model whose values all stay below ``limit`` is computed as it is. One whose bound is up to
    MAX_SCALE_DOWN times too large is computed with its values divided by a whole number (the
    servers multiply the answer's shares back, exactly). Any other is refused.
    """
    peak = max(bound for _, bound in bounds(keras_model))
    divisor = 1 if peak < limit else int(peak // limit) + 1
    if divisor > MAX_SCALE_DOWN:
        check_fits(keras_model, limit)  # raises, naming the layer
    computed = keras_model if divisor == 1 else scaled_down(keras_model, divisor)
    check_fits(computed, limit)
    return computed, divisor, peak
