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

The servers apply ``model.layers`` one after the other, each once, and recognise layers and
activations by name. So a model is accepted only if Keras computes it the same way: a
Sequential or functional model applying its layers as one chain, in that order, each once; and
layers of Keras's own classes (not subclasses, Lambda or custom layers), whose activations are
Keras's own ReLU or linear function (the objects themselves, not functions of the same name).
"""
from typing import List, Tuple

import numpy as np

from ._tf import tf
from .protocol import FIXED_POINT

# What tf.keras.Model(inputs, outputs) builds, which Keras 2.9 does not export under tf.keras. Imported
# after ._tf, which checks the Python and TensorFlow versions before TensorFlow is first imported.
from keras.engine.functional import Functional

SCALE = FIXED_POINT.scaling_factor

# The servers round each weight w to round(w / area * scale) / scale and each bias b to
# round(b * scale^2) / scale^2 (network.py): half a unit off at most, plus the float32 rounding of
# w / area * scale before the round, below 2^-24 of it per operation. A weight is therefore within
# half a unit plus 2^-22 of its magnitude of the one Keras holds. The same relative margin covers,
# many times over, the float64 rounding of the sums in this module (about 2^-53 per term).
FLOAT_MARGIN = 2.0 ** -22

SERVERS_COMPUTE = ("The servers compute Conv2D and Dense layers (with activation 'relu' or 'linear'), "
                   "AveragePooling2D, Flatten and Activation('relu') or Activation('linear') layers only")
# The layers the servers compute, by their exact classes. network.py recognises a layer by its
# class's name and computes what Keras's layer of that name does: a subclass (whose call may compute
# anything) or another class of the same name would be computed as something it is not.
COMPUTED_LAYERS = (tf.keras.layers.Conv2D, tf.keras.layers.Dense, tf.keras.layers.AveragePooling2D,
                   tf.keras.layers.Flatten, tf.keras.layers.Activation)
# Keras's own activation functions, by identity, for the same reason: network.py recognises an
# activation by the name Keras serialises, which any function can have ("relu" for a function named
# relu, or one registered under that name). TensorFlow's tf.nn.relu computes the same as Keras's, but
# it is refused too (with the advice to use 'relu'): the proof then trusts these two objects only.
RELU, LINEAR = tf.keras.activations.relu, tf.keras.activations.linear
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
    function, name = layer.activation, layer.get_config()["activation"]
    if function is RELU or function is LINEAR:
        return
    if function is tf.nn.relu:
        _refuse(layer, "has activation tf.nn.relu, TensorFlow's ReLU, but the servers recognise Keras's own only",
                "Use activation='relu' instead: the same function, no retraining needed")
    if name in ("relu", "linear"):
        where = f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', type(function).__name__)}"
        _refuse(layer, f"has an activation named {name!r} that is not Keras's own ({where}), but the servers "
                f"would compute Keras's {name!r} whatever it computes",
                f"Use activation={name!r} (the string: Keras's own function), and retrain unless yours computes the same")
    _refuse(layer, f"has activation {name!r}, but the servers compute 'relu' and 'linear' only",
            "Use 'linear' on the last layer (the client applies the softmax to the logits), 'relu' elsewhere")


def _check_kind(layer):
    if type(layer) in COMPUTED_LAYERS:
        return
    if isinstance(layer, tf.keras.Model):
        _refuse(layer, "is a model inside the model, but the servers compute layers only, and would skip it",
                "List its layers in the outer model instead, e.g. tf.keras.Sequential(inner.layers + [...])")
    keras_class = next((kind for kind in COMPUTED_LAYERS if isinstance(layer, kind)), None)
    if keras_class is not None:
        _refuse(layer, f"is a subclass of tf.keras.layers.{keras_class.__name__}, but the servers compute "
                f"Keras's own {keras_class.__name__}, not the subclass's code",
                f"Use tf.keras.layers.{keras_class.__name__} itself, and retrain unless the subclass computes the same")
    if isinstance(layer, tf.keras.layers.Lambda):
        _refuse(layer, "runs a Python function, which the servers cannot compute",
                f"{SERVERS_COMPUTE}. Build the model from those layers and retrain it")
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


def _check_rank(layer, node):
    rank = node.keras_inputs[0].shape.rank  # in this model: a layer of another model has its inputs there too
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


def _applied_layers(keras_model):
    """The layers the model applies, from its input to its output, each with the node (the call) that
    applies it; refuses a model that is not a chain the servers walk as Keras does.

    The walk goes back from the output to the input, from each layer to the one that made its input:
    each layer must take one input, and the layers met must be model.layers, in that order (the
    servers' order), each met once. Counting a layer's inbound nodes would not do: a layer also used in another
    model has that model's nodes too, which this model does not apply.
    """
    if type(keras_model) not in (tf.keras.Sequential, Functional):
        raise UnsupportedModelError(
            f"The model is a {type(keras_model).__name__}, a subclass of tf.keras.Model: the servers apply its "
            "layers one after the other, and would not run its own code (its call). Build it with "
            "tf.keras.Sequential or tf.keras.Model(inputs, outputs) from the layers the servers compute.")
    if not keras_model.outputs:
        raise UnsupportedModelError(
            f"The model {keras_model.name} has not been built, so its input shape, which the proof starts "
            "from, is unknown. Give its first layer input_shape=(height, width, channels), e.g. (28, 28, 1) for "
            "MNIST, or start it with tf.keras.Input((28, 28, 1)).")
    if len(keras_model.inputs) != 1 or len(keras_model.outputs) != 1:
        raise UnsupportedModelError(
            f"The model has {len(keras_model.inputs)} input(s) ({', '.join(keras_model.input_names)}) and "
            f"{len(keras_model.outputs)} output(s) ({', '.join(keras_model.output_names)}), but the servers "
            "take one image and return one vector per image. Build a model with one input and one output "
            "for the servers, e.g. tf.keras.Model(images, logits).")
    applied, tensor = [], keras_model.outputs[0]
    while True:
        layer, node_index, _ = tensor._keras_history
        node = layer.inbound_nodes[node_index]
        if node.is_input:  # the model's InputLayer: the start
            break
        if len(node.keras_inputs) != 1:
            _refuse(layer, f"takes {len(node.keras_inputs)} inputs (a branch or a skip connection joins "
                    "there), but the servers compute a single chain of layers, each on the previous one's output",
                    "Build the model as a chain of the layers the servers compute, e.g. a tf.keras.Sequential")
        applied.insert(0, (layer, node))
        tensor = node.keras_inputs[0]
    layers = [layer for layer, _ in applied]
    for layer in layers:
        if layers.count(layer) > 1:
            _refuse(layer, f"is applied {layers.count(layer)} times, but the servers apply each layer once, "
                    "in the order of model.layers", "Give each application a layer of its own (with the same "
                    "weights, it computes the same)")
    listed = [layer for layer in keras_model.layers if type(layer) is not tf.keras.layers.InputLayer]
    if layers != listed:
        raise UnsupportedModelError(
            f"The model applies its layers in the order {', '.join(layer.name for layer in layers)}, but the "
            f"servers apply them in the order of model.layers: {', '.join(layer.name for layer in listed)}. "
            "Build it as a tf.keras.Sequential of its layers, in the order it applies them.")
    return applied


def _check_model(keras_model):
    """Raise UnsupportedModelError for a model that the servers would not compute as Keras does."""
    applied = _applied_layers(keras_model)  # first: a model with several inputs has no single input shape
    if len(keras_model.input_shape) != 4:
        raise UnsupportedModelError(
            f"The model takes inputs of shape {keras_model.input_shape}, but the servers take images "
            "(height x width x channels). Start the model with a Conv2D or Flatten layer on images.")
    for layer, node in applied:
        _check_kind(layer)
        _check_options(layer)
        _check_rank(layer, node)
    _check_end(keras_model)


# Interval arithmetic on what the servers hold --------------------------------------------------

def _magnitude(box) -> float:
    return float(max(np.abs(box[0]).max(), np.abs(box[1]).max()))


def _truncated(box, scale):
    """The servers' truncation (truncation.py) returns floor(x / scale) or one more: the value moves
    by less than one unit (1 / scale) either way."""
    return box[0] - 1.0 / scale, box[1] + 1.0 / scale


def _relu(box, scale=None):
    """The servers keep the truncated value where the value before truncation is >= 0, which makes
    it >= 0 too (floor plus 0 or 1): the ReLU of the truncated box holds it. A ReLU that truncates
    (``scale``) may also keep a value just below 0 (relu.py skips the bits below the scale in its
    comparison): its truncation is then -1 or 0, so nothing kept is below -1 unit (1 / scale)."""
    floor = 0.0 if scale is None else -1.0 / scale
    return np.maximum(box[0], floor), np.maximum(box[1], 0)


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
    return type(layer).__name__ in ("Conv2D", "Dense", "Activation") and layer.activation is RELU


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
            box, doubled = (_relu(_truncated(box, scale), scale) if doubled else _relu(box)), False
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
