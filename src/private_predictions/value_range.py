"""A proven bound on every value the servers compute, for any input with pixels in [0, 1].

The servers compute on fixed-point numbers with a fixed integer part: a value that
leaves it is compared and truncated wrongly (the ReLU looks at the bits the bound allows only). Observing MNIST images proves nothing about what a client may send, so
before a model is shared its values are bounded by interval arithmetic: each layer
maps a box of possible inputs to a box containing all of its outputs (a lower and an
upper bound for every value), from the box [0, 1] of the input pixels onwards.

The boxes hold what the servers hold (network.py), not what Keras computes: the weights as the
servers round them, the values before each ReLU (whose sign the servers compare), the sums where
Keras averages, and the error of every truncation. A model with a layer or an option that the
servers would not compute as Keras does is refused here, before anything is shared.
"""
from typing import List, Tuple

import numpy as np

from ._tf import tf
from .protocol import FIXED_POINT

SCALE = FIXED_POINT.scaling_factor

# The servers round each weight w to round(w / area * scale) / scale and each bias b to
# round(b * scale^2) / scale^2 (network.py): half a unit off at most, plus the float32 rounding of
# w / area * scale before the round, below 2^-24 of it per operation. A weight is therefore within
# half a unit plus 2^-22 of its magnitude of the one Keras holds. The same relative margin covers,
# many times over, the float64 rounding of the sums in this module (about 2^-53 per term).
FLOAT_MARGIN = 2.0 ** -22

SERVERS_COMPUTE = ("The servers compute Conv2D and Dense layers (with activation 'relu' or 'linear'), "
                   "AveragePooling2D, Flatten and Activation('relu') or Activation('linear') layers only")
INSTEAD = {
    "MaxPooling2D": "Use AveragePooling2D instead, and retrain",
    "ReLU": "Use Activation('relu') instead: the same function, no retraining needed",
    "Dropout": "Remove it from the model before sharing it: it changes nothing in predictions",
    "BatchNormalization": "Fold it into the previous layer's kernel and bias before sharing the model",
    "Softmax": "Remove it: the servers return logits, and the client applies the softmax",
}


class ValueRangeError(ValueError):
    """The model can compute values that the fixed-point encoding cannot hold."""


class UnsupportedModelError(ValueRangeError):
    """The model has a layer or an option that the servers do not compute as Keras does."""


def kernel_and_bias(layer):
    """A convolution's or dense layer's kernel and bias (zeros for a layer built with use_bias=False)."""
    kernel, *bias = layer.get_weights()
    return kernel, bias[0] if bias else np.zeros(kernel.shape[-1], kernel.dtype)


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


# What the servers compute, and what they do not --------------------------------------------------

def _refuse(layer, problem: str, advice: str):
    raise UnsupportedModelError(f"Layer {layer.name} ({type(layer).__name__}) {problem}. {advice}.")


def _check_activation(layer):
    name = layer.get_config()["activation"]
    if name not in ("relu", "linear"):
        _refuse(layer, f"has activation {name!r}, but the servers compute 'relu' and 'linear' only",
                "Use 'linear' on the last layer (the client applies the softmax to the logits), 'relu' elsewhere")


def _check_kind(layer):
    if type(layer).__name__ not in ("Conv2D", "Dense", "AveragePooling2D", "Flatten", "Activation"):
        _refuse(layer, "is not a layer the servers can compute", f"{SERVERS_COMPUTE}. "
                + INSTEAD.get(type(layer).__name__, "Build the model from those layers and retrain it"))


def _check_options(layer):
    """Refuse the options that the servers ignore: Keras would compute one thing, the servers another."""
    kind, config = type(layer).__name__, layer.get_config()
    if config.get("data_format", "channels_last") != "channels_last":
        _refuse(layer, f"has data_format {config['data_format']!r}, which the servers ignore: they hold "
                "images as Keras does by default", "Build it with data_format='channels_last'")
    if kind == "Conv2D" and tuple(config["dilation_rate"]) != (1, 1):
        _refuse(layer, f"has dilation_rate {tuple(config['dilation_rate'])}, which the servers ignore: they "
                "compute undilated convolutions only", "Build it with dilation_rate=1 and retrain")
    if kind == "Conv2D" and config["groups"] != 1:
        _refuse(layer, f"has groups={config['groups']}, which the servers ignore: they convolve all input "
                "channels together", "Build it with groups=1 and retrain")
    if kind == "AveragePooling2D" and (tuple(layer.strides) != tuple(layer.pool_size)
                                       or layer.padding.upper() != "VALID"):
        _refuse(layer, "pools with strides {} and padding {!r}, but the servers pool non-overlapping windows "
                "only (strides equal to pool_size, padding 'valid')".format(tuple(layer.strides), layer.padding),
                f"Use AveragePooling2D({tuple(layer.pool_size)}) with its default strides and padding")
    if kind in ("Conv2D", "Dense", "Activation"):
        _check_activation(layer)


def _check_rank(layer):
    rank = len(layer.input_shape)
    if type(layer).__name__ == "Dense" and rank != 2:
        _refuse(layer, f"gets {rank}-D inputs, but the servers multiply 2-D ones only (a vector per image)",
                "Put a Flatten layer before it")
    if type(layer).__name__ == "Flatten" and rank != 4:
        _refuse(layer, f"gets {rank}-D inputs, but the servers flatten images (4-D) only",
                "Remove it: it changes nothing there")


def _check_end(keras_model):
    """The servers' answer is Keras's only if no pooling follows the last weighted layer and it is 2-D."""
    area = servers_factors(keras_model)[-1]
    if area != 1.0:
        pooling = [layer for layer in keras_model.layers if type(layer).__name__ == "AveragePooling2D"]
        _refuse(pooling[-1], "comes after the model's last Conv2D or Dense layer: the servers sum each window "
                "where Keras averages and divide the sums in the next such layer's weights, so without one "
                f"they would answer {area:.0f} times what Keras does",
                "End the model with a Dense layer (e.g. Flatten then Dense)")
    if len(keras_model.output_shape) != 2:
        _refuse(keras_model.layers[-1], f"gives the model's output the shape {keras_model.output_shape}, but "
                "the servers return a vector per image only (they hold images channels first, in another "
                "order than Keras)", "End the model with Flatten and Dense")


def _check_model(keras_model):
    """Raise UnsupportedModelError for a model that the servers would not compute as Keras does."""
    if len(keras_model.input_shape) != 4:
        raise UnsupportedModelError(
            f"The model takes inputs of shape {keras_model.input_shape}, but the servers take images "
            "(height x width x channels). Start the model with a Conv2D or Flatten layer on images.")
    for layer in keras_model.layers:
        if type(layer).__name__ != "InputLayer":
            _check_kind(layer)
            _check_options(layer)
            _check_rank(layer)
    _check_end(keras_model)


# Interval arithmetic on what the servers hold --------------------------------------------------

def _magnitude(box) -> float:
    return float(max(np.abs(box[0]).max(), np.abs(box[1]).max()))


def _truncated(box, scale):
    """The servers' truncation (truncation.py) returns floor(x / scale) or one more: the value moves
    by less than one unit (1 / scale) either way."""
    return box[0] - 1.0 / scale, box[1] + 1.0 / scale


def _relu(box):
    """The servers keep the truncated value where the value before truncation is >= 0, which makes
    it >= 0 too (floor plus 0 or 1): the ReLU of the truncated box holds it."""
    return np.maximum(box[0], 0), np.maximum(box[1], 0)


def _weights(layer, area: float, scale: float):
    """The kernel and bias as (centre, radius) intervals that hold the servers' rounded ones."""
    kernel, bias = (values.astype(np.float64) for values in kernel_and_bias(layer))
    kernel = kernel / area  # the pooling's division, moved into the weights (network.py)
    return ((kernel, 0.5 / scale + np.abs(kernel) * FLOAT_MARGIN),
            (bias, 0.5 / scale ** 2 + np.abs(bias) * FLOAT_MARGIN))


def _linear(box, apply, kernel, bias):
    """Every value of apply(x, w) + b for x in the box, w and b in their intervals (centre, radius).

    x w - xc wc = xc (w - wc) + (x - xc) w, at most |xc| rw + rx (|wc| + rw) in magnitude: a sum of
    such bounds (apply with non-negative arguments) holds every sum of products.
    """
    low, high = box
    centre, radius = (low + high) / 2, (high - low) / 2
    (w, w_radius), (b, b_radius) = kernel, bias
    middle = apply(centre, w) + b
    spread = apply(radius, np.abs(w)) + apply(np.abs(centre) + radius, w_radius) + b_radius
    return middle - spread, middle + spread


def _apply(layer):
    if type(layer).__name__ == "Dense":
        return lambda x, w: x @ w
    return lambda x, w: tf.nn.conv2d(x, w, strides=layer.strides, padding=layer.padding.upper()).numpy()


def _sum_pool(box, layer):
    """Each window's sum, as the servers compute it: rows and columns short of a window are dropped."""
    height, width = layer.pool_size

    def pool(x):
        n, h, w, c = x.shape
        windows = x[:, :h // height * height, :w // width * width].reshape(n, h // height, height, w // width, width, c)
        return windows.sum(axis=(2, 4))

    return pool(box[0]), pool(box[1])


def _relu_in(layer) -> bool:
    return type(layer).__name__ in ("Conv2D", "Dense", "Activation") and layer.get_config()["activation"] == "relu"


def bounds(keras_model, low: float = 0.0, high: float = 1.0, scale: float = SCALE) -> List[Tuple[str, float]]:
    """Each layer's name and the largest magnitude any value of it can reach on the servers, for
    inputs in [low, high]; for a layer with a fused ReLU, before the ReLU as well as after it.

    Raises UnsupportedModelError for a model the servers do not compute as Keras does.
    """
    _check_model(keras_model)
    shape = (1,) + tuple(keras_model.input_shape[1:])
    box = (np.full(shape, low, np.float64), np.full(shape, high, np.float64))
    doubled = False  # whether the values carry the scale twice (a product not truncated yet), as in network.py
    found = []
    for layer, area in zip(keras_model.layers, [1.0] + servers_factors(keras_model)[:-1]):
        kind, before_relu = type(layer).__name__, 0.0
        if kind in ("Conv2D", "Dense"):
            box = _linear(_truncated(box, scale) if doubled else box, _apply(layer), *_weights(layer, area, scale))
            doubled, before_relu = True, _magnitude(box)
        elif kind == "AveragePooling2D":
            box = _sum_pool(box, layer)
        elif kind == "Flatten":
            box = (box[0].reshape(1, -1), box[1].reshape(1, -1))
        if _relu_in(layer):
            box, doubled = _relu(_truncated(box, scale) if doubled else box), False
        found.append((layer.name, max(before_relu, _magnitude(box))))
    if doubled:  # the answer is truncated once more before it is returned
        found[-1] = (found[-1][0], max(found[-1][1], _magnitude(_truncated(box, scale))))
    return found


def _too_large(found, limit: float) -> ValueRangeError:
    name, bound = max(found, key=lambda item: item[1])
    return ValueRangeError(
        f"This model can compute values up to {bound:.0f} in magnitude (layer {name}), but the "
        f"fixed-point encoding holds values below {limit:.0f} only, and a value outside it would "
        "be compared and truncated wrongly. Retrain with smaller weights (e.g. L2 regularisation) or fewer "
        "filters, or scale the inputs down.")


def check_fits(keras_model, limit: float, scale: float = SCALE) -> List[Tuple[str, float]]:
    """Raise ValueRangeError unless every value the model can compute stays below ``limit`` in magnitude."""
    found = bounds(keras_model, scale=scale)
    if max(bound for _, bound in found) >= limit:
        raise _too_large(found, limit)
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


def fitting(keras_model, limit: float, scale: float = SCALE):
    """(the model to compute, the divisor of its values, the proven bound of the original model).

    A model whose values all stay below ``limit`` is computed as it is. One whose bound is up to
    MAX_SCALE_DOWN times too large is computed with its values divided by a whole number (the
    servers multiply the answer's shares back, exactly). Any other is refused, and so is a model
    the servers do not compute as Keras does (UnsupportedModelError), before anything is shared.
    """
    found = bounds(keras_model, scale=scale)
    peak = max(bound for _, bound in found)
    # The rounding margins do not shrink with the values, so a divisor that divides the bound just
    # enough may leave the scaled model's bound a little above the limit: the next one is tried.
    for divisor in range(1 if peak < limit else int(peak // limit) + 1, MAX_SCALE_DOWN + 1):
        if divisor == 1:
            return keras_model, 1, peak
        computed = scaled_down(keras_model, divisor)
        if max(bound for _, bound in bounds(computed, scale=scale)) < limit:
            return computed, divisor, peak
    raise _too_large(found, limit)
