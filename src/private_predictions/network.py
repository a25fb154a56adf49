"""The network as the servers compute it: a Keras model's layers on secret shares.

First the servers turn every pixel into one in [0, 1] (relu.clip: its 16 lowest bits, a pixel of 1
being 2^16 - 1): a client running code of its own may send any words as shares, and the value-range
proof, with what answers reveal of the weights, covers images with pixels in [0, 1] only. A client of
the series' code sends such images; the clip changes nothing for them.

Three choices make it cheaper than running the same layers through tf-encrypted's Keras layers,
without changing what anyone learns:

* **Average pooling sums.** Dividing a share by the window's area would cost a round of messages
  (a truncation); the division moves into the next layer's weights instead, which the model owner
  divides before sharing them. The values in between are area times larger, and the value-range
  proof bounds those (value_range.servers_factors).
* **Products are truncated by the ReLU.** A product of two fixed-point numbers carries the scale
  twice and must be divided once by the scale (a truncation, truncation.py). The ReLU's comparison
  opens the product plus a uniformly random mask anyway: the truncation reads its result off that
  opening, and costs no opening of its own. Values that reach no ReLU (the logits) are truncated
  with an opening of their own. Every value opened is uniformly random.
* **A ReLU that uses the proven bound** (relu.py): it needs three message hops, and compares 28 bits
  instead of 64 after a product (bits 15 to 42; the 15 below the scale change the truncated result by
  one unit at most, which the value-range proof counts), 26 for a value at the single scale.
"""
from typing import Dict, List, Tuple

import numpy as np
from tf_encrypted.protocol.pond.pond import PondPrivateTensor

from ._tf import tf
from .product import MaskedWeights, product
from .relu import clip, relu
from .truncation import truncate
from .value_range import kernel_and_bias, servers_factors

NCHW, NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


def _bits_below(bound: float) -> int:
    """The k with bound <= 2^k: values proven below ``bound`` in magnitude fit in k bits and a sign."""
    return int(np.ceil(np.log2(bound)))


class SecretNetwork:
    """A Keras model's weights as secret shares on the servers, and the computation on them.

    Weights are shared as whole numbers round(w * scale), biases as round(b * scale^2): a
    product of an input at scale ``scale`` with a weight is then at scale^2 as the bias is.
    """

    def __init__(self, protocol, keras_model, limit: float):
        self.protocol = protocol
        encoding = protocol.fixedpoint_config
        self.scale = encoding.scaling_factor
        # Values are proven below ``limit`` (value_range.fitting); at the products' double scale
        # they are below limit * scale^2, and their signs are compared on that many bits.
        self.bits_single = _bits_below(limit * self.scale)
        self.bits_double = _bits_below(limit * float(self.scale) ** 2)
        for layer in keras_model.layers:  # before any weight is shared
            if type(layer).__name__ == "AveragePooling2D" and (
                    tuple(layer.strides) != tuple(layer.pool_size) or layer.padding.upper() != "VALID"):
                raise ValueError(
                    f"{layer.name}: the servers pool non-overlapping windows only (strides equal to "
                    f"pool_size, padding 'valid'), not strides {layer.strides} with padding {layer.padding!r}")
        self.steps: List[Tuple] = []
        self.weights: Dict[int, Tuple] = {}
        self.masked: Dict[int, MaskedWeights] = {}
        factors = servers_factors(keras_model)
        for index, (layer, area_before) in enumerate(zip(keras_model.layers, [1.0] + factors[:-1])):
            kind = type(layer).__name__
            if kind in ("Conv2D", "Dense"):
                kernel, bias = kernel_and_bias(layer)
                if kind == "Conv2D":
                    bias = bias.reshape(-1, 1, 1)  # added to NCHW outputs
                self.weights[index] = (
                    protocol.define_private_variable(np.round(kernel / area_before * self.scale), apply_scaling=False),
                    protocol.define_private_variable(np.round(bias * float(self.scale) ** 2), apply_scaling=False))
                self.masked[index] = MaskedWeights(protocol, self.weights[index][0])  # opened once (product.py)
                self.steps.append((kind, index, layer))
                if layer.get_config()["activation"] == "relu":
                    self.steps.append(("ReLU", index, layer))
            elif kind == "Activation" and layer.get_config()["activation"] == "relu":
                self.steps.append(("ReLU", index, layer))
            elif kind in ("AveragePooling2D", "Flatten"):
                self.steps.append((kind, index, layer))

    def kernel_shares(self, layer: int):
        """What server0 and server1 hold of one layer's kernel, as integers (round(w * scale))."""
        share0, share1 = self.weights[layer][0].unwrapped
        return share0.read_value().value.numpy(), share1.read_value().value.numpy()

    def __call__(self, x: PondPrivateTensor) -> PondPrivateTensor:
        """The network's output for ``x`` (NHWC, at the encoding's scale), at the same scale."""
        protocol = self.protocol
        x = protocol.transpose(clip(protocol, x, self.scale), perm=NCHW)  # a pixel of 1 is the scale
        doubled = False  # whether x still carries the scale twice (an untruncated product)
        pooled = None  # a pooling already done with the product before it
        for number, (kind, index, layer) in enumerate(self.steps):
            if kind in ("Conv2D", "Dense"):
                if doubled:
                    x = truncate(protocol, x, self.bits_double, self.scale)
                if kind == "Conv2D":
                    strides, padding = layer.strides, layer.padding.upper()
                    apply = lambda u, v: u.conv2d(v, strides, padding)  # noqa: E731
                else:
                    apply = lambda u, v: u.matmul(v)  # noqa: E731
                following = self.steps[number + 1] if number + 1 < len(self.steps) else (None, None, None)
                pooled = following[2] if following[0] == "AveragePooling2D" else None
                then = (lambda value, pool=pooled: _window_sums(value, pool)) if pooled else (lambda value: value)
                x = product(protocol, x, self.masked[index], self.weights[index][1].read_value(), apply, then)
                doubled = True
            elif kind == "AveragePooling2D":
                if layer is not pooled:
                    x = _sum_pool(protocol, x, layer)
            elif kind == "ReLU":
                x = relu(protocol, x, self.bits_double, divisor=self.scale) if doubled else \
                    relu(protocol, x, self.bits_single)
                doubled = False
            elif kind == "Flatten":
                x = protocol.reshape(protocol.transpose(x, perm=NHWC), [x.shape[0], -1])
        return truncate(protocol, x, self.bits_double, self.scale) if doubled else x


def _window_sums(value, layer):
    """Each window's sum of one server's words (NCHW); rows and columns short of a window are dropped."""
    height, width = layer.pool_size
    n, c, h, w = value.shape.as_list()
    windows = tf.reshape(value[:, :, :h // height * height, :w // width * width],
                         [n, c, h // height, height, w // width, width])
    return tf.reduce_sum(windows, axis=[3, 5])


def _sum_pool(protocol, x, layer):
    """Each window's sum, on each server's share alone: a sum of shares is a share of the sum."""
    pooled = []
    for share, device in zip(x.unwrapped, (protocol.server_0.device_name, protocol.server_1.device_name)):
        with tf.device(device):
            pooled.append(protocol.tensor_factory.tensor(_window_sums(share.value, layer)))
    return PondPrivateTensor(protocol, pooled[0], pooled[1], x.is_scaled)
