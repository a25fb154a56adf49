"""The servers' truncation (truncation.py): floor(x / D) or one more, and an opening that is uniformly random."""
import numpy as np
import pytest
from tf_encrypted.protocol.pond.pond import PondPrivateTensor

from private_predictions import connect
from private_predictions._tf import tf
from private_predictions.protocol import FIXED_POINT
from private_predictions.truncation import offset, quotient_share, truncate, wrap_material

SCALE, K = FIXED_POINT.scaling_factor, 42  # the network's divisor and the bound of its products (2^42 > 729 * 3^20)


def combine(x, r, divisor, k, dtype):
    """floor(x / divisor) + e as the two servers compute it, for masks r, and the opened values c."""
    bits = dtype.size * 8
    words = lambda values: tf.constant(((values + 2**(bits - 1)) % 2**bits - 2**(bits - 1)).astype(np.int64), tf.int64)
    shift = offset(k, divisor, bits)
    r_quotient, wrap = wrap_material(tf.cast(words(r), dtype), divisor)
    generator = np.random.default_rng(0)
    split = [tf.cast(words(generator.integers(0, 2**bits, np.shape(x), dtype=np.uint64).astype(object)), dtype)
             for _ in range(2)]
    c_words = np.array([(int(a) + shift + int(b)) % 2**bits for a, b in zip(np.ravel(x), np.ravel(r))], dtype=object)
    c = tf.cast(words(c_words.reshape(np.shape(x))), dtype)
    y = (quotient_share(0, c, shift, divisor, split[0], split[1])
         + quotient_share(1, c, shift, divisor, r_quotient - split[0], wrap - split[1]))
    y = (y.numpy().astype(object) + 2**(bits - 1)) % 2**bits - 2**(bits - 1)
    return y, c_words.reshape(np.shape(x))


@pytest.mark.parametrize("divisor", [2, 3, 5, 7, 10, 16, 27])
def test_exact_for_every_value_and_every_mask_on_8_bit_words(divisor):
    for k in range(1, 7):
        try:
            offset(k, divisor, 8)
        except ValueError:
            continue  # 2L must stay below 2^7
        x, r = (grid.ravel() for grid in np.meshgrid(np.arange(-2**k, 2**k), np.arange(256), indexing="ij"))
        y, c = combine(x, r, divisor, k, tf.int8)
        assert set(y - np.floor_divide(x, divisor)) <= {0, 1}, (divisor, k)
        # What is opened: for each value, every mask gives another word, so all 256 words come out once.
        for value in range(-2**k, 2**k):
            assert sorted(c[x == value]) == list(range(256))


def test_exact_at_the_edges_on_64_bit_words():
    shift, ring, half = offset(K, SCALE), 2**64, 2**63
    for value in (-2**K, -2**K + 1, -1, 0, 1, 2**K - 1):
        v = value + shift
        masks = [0, SCALE - 1, ring % SCALE, half - 1, half, ring - v - 1, ring - v, ring - 1, 12345678901234567]
        y, _ = combine(np.array([value] * len(masks), dtype=object), np.array(masks, dtype=object), SCALE, K, tf.int64)
        assert set(y - value // SCALE) <= {0, 1}, value


def test_an_offset_that_64_bit_words_cannot_hold_is_refused():
    with pytest.raises(ValueError, match="cannot be truncated"):
        offset(62, 3)


@pytest.fixture(scope="module")
def protocol(cluster):
    return connect(cluster.config)


def test_on_the_servers_every_value_is_divided_with_the_same_rounding(protocol):
    edges = np.array([-2**K, -2**K + 1, -1, 0, 1, SCALE - 1, SCALE, 2**K - 1], dtype=np.int64)
    values = np.concatenate([np.tile(edges, 50), np.random.default_rng(2).integers(-2**K, 2**K, 2000)])

    @tf.function
    def compute():
        share0 = tf.constant(np.random.default_rng().integers(-2**63, 2**63, values.shape, dtype=np.int64))
        tensors = []
        for share, server in ((share0, protocol.server_0), (tf.constant(values) - share0, protocol.server_1)):
            with tf.device(server.device_name):
                tensors.append(protocol.tensor_factory.tensor(tf.identity(share)))
        y0, y1 = truncate(protocol, PondPrivateTensor(protocol, *tensors, False), K, SCALE).unwrapped
        return y0.value, y1.value

    y0, y1 = compute()
    assert set(y0.numpy() + y1.numpy() - values // SCALE) <= {0, 1}
