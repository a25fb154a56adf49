"""The servers' ReLU (relu.py): exact for every value within its bound, and server2 learns nothing."""
import numpy as np
import pytest
from tf_encrypted.protocol.pond.pond import PondPrivateTensor

import private_predictions.relu as relu_module
from private_predictions import connect
from private_predictions._tf import tf
from private_predictions.relu import PRIME, relu


@pytest.fixture(scope="module")
def protocol(cluster):
    return connect(cluster.config)


def shared(protocol, values):
    """Shares of whole numbers, made here: server0 gets random words, server1 the differences."""
    share0 = np.random.default_rng().integers(-2**63, 2**63, size=values.shape, dtype=np.int64)
    with np.errstate(over="ignore"):
        share1 = values.astype(np.int64) - share0
    tensors = []
    for share, server in ((share0, protocol.server_0), (share1, protocol.server_1)):
        with tf.device(server.device_name):
            tensors.append(protocol.tensor_factory.tensor(tf.constant(share)))
    return PondPrivateTensor(protocol, tensors[0], tensors[1], False)


def run(protocol, values, bound_bits, sign_of=None, also=lambda: ()):
    """The ReLU's result, rebuilt here, and whatever ``also`` hands back from inside the computation."""
    @tf.function
    def compute():
        signs = None if sign_of is None else shared(protocol, sign_of)
        y0, y1 = relu(protocol, shared(protocol, values), bound_bits, sign_of=signs).unwrapped
        return y0.value, y1.value, also()

    share0, share1, extra = compute()
    return share0.numpy() + share1.numpy(), extra


def test_exact_for_every_value_a_small_bound_allows(protocol):
    values = np.tile(np.arange(-2**6, 2**6), 20)  # each value meets many random masks
    result, _ = run(protocol, values, bound_bits=6)
    np.testing.assert_array_equal(result, np.maximum(values, 0))


def test_exact_at_the_edges_of_the_bound_the_network_uses(protocol):
    k = 42
    edges = np.array([-2**k, -2**k + 1, -1, 0, 1, 2**k - 1], dtype=np.int64)
    values = np.concatenate([np.tile(edges, 100), np.random.default_rng(0).integers(-2**k, 2**k, 2000)])
    result, _ = run(protocol, values, bound_bits=k)
    np.testing.assert_array_equal(result, np.maximum(values, 0))


def test_the_sign_can_come_from_the_value_before_truncation(protocol):
    generator = np.random.default_rng(1)
    values = generator.integers(-1000, 1000, 500)
    before = generator.integers(-2**40, 2**40, 500)  # independent of values: only its sign may matter
    result, _ = run(protocol, values, bound_bits=41, sign_of=before)
    np.testing.assert_array_equal(result, np.where(before >= 0, values, 0))


@pytest.mark.parametrize("value", [5, -5])
def test_what_server2_sees_does_not_depend_on_the_value(protocol, monkeypatch, value):
    seen = []

    def watched(numbers):
        seen.append(numbers)
        return original(numbers)

    original = relu_module._zero_anywhere
    monkeypatch.setattr(relu_module, "_zero_anywhere", watched)
    k, count = 6, 3000
    result, numbers = run(protocol, np.full(count, value), bound_bits=k, also=lambda: seen[-1])
    np.testing.assert_array_equal(result, np.full(count, max(value, 0)))
    numbers = numbers.numpy()
    has_zero = (numbers == 0).any(axis=1)
    # Whether a row holds a zero is the comparison XOR a random bit: a coin toss, for any value.
    assert 0.45 < has_zero.mean() < 0.55
    # At most one zero, at a uniformly random place (a rotation only server0 and server1 know) ...
    assert ((numbers == 0).sum(axis=1) <= 1).all()
    places = np.bincount(np.argmax(numbers[has_zero] == 0, axis=1), minlength=k)
    assert places.max() < 1.4 * places.mean()
    # ... and every other number uniformly random among 1 ... PRIME - 1 (random multipliers).
    others = numbers[numbers != 0]
    assert abs(others.mean() - PRIME / 2) < 1.0 and others.min() >= 1 and others.max() == PRIME - 1


@pytest.mark.parametrize("bound_bits", [0, 63])
def test_a_bound_outside_what_64_bit_words_hold_is_refused(bound_bits):
    with pytest.raises(ValueError, match="between 1 and 62"):
        relu(None, None, bound_bits)
