"""The servers' ReLU (relu.py): exact for every value within its bound, and server2 learns nothing."""
import numpy as np
import pytest

import private_predictions.relu as relu_module
from conftest import shared
from private_predictions import connect
from private_predictions._tf import tf
from private_predictions.protocol import FIXED_POINT
from private_predictions.relu import WHOLE_RING, clip, prime_for, relu

SCALE = FIXED_POINT.scaling_factor  # the encoding's: a pixel of 1, and what a product's truncation divides by


@pytest.fixture(scope="module")
def protocol(cluster):
    return connect(cluster.config)


def run(protocol, values, bound_bits, divisor=1, also=lambda: ()):
    """The ReLU's result, rebuilt here, and whatever ``also`` hands back from inside the computation."""
    @tf.function
    def compute():
        y0, y1 = relu(protocol, shared(protocol, values), bound_bits, divisor=divisor).unwrapped
        return y0.value, y1.value, also()

    share0, share1, extra = compute()
    return share0.numpy() + share1.numpy(), extra


def test_every_compiled_step_runs_on_a_server(protocol):
    """XLA compiles parts of the comparison into functions; each call must run on a server, the one whose
    shares it works on, never where the graph is built (the model owner's process would see them)."""
    @tf.function
    def compute():
        y0, y1 = relu(protocol, shared(protocol, np.arange(-5, 5)), 6, divisor=SCALE).unwrapped
        return y0.value, y1.value

    graph = compute.get_concrete_function().graph
    servers = {protocol.server_0.device_name, protocol.server_1.device_name, protocol.server_2.device_name}
    calls = [op for op in graph.get_operations() if op.type in ("PartitionedCall", "StatefulPartitionedCall")]
    assert calls, "no compiled step found"
    assert {op.device for op in calls} == servers, [(op.name, op.device) for op in calls]
    for op in calls:  # and each where its inputs are: nothing moves to a compiled step
        assert {tensor.op.device for tensor in op.inputs} == {op.device}, (op.name, op.device)


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


def test_a_product_is_truncated_on_the_way_with_the_sign_of_the_value_before(protocol):
    scale, k = SCALE, 42
    skipped = 2**15  # the largest power of 2 up to the scale: the comparison skips the bits below it
    edges = np.array([-2**k, -2**k + 1, -scale, -skipped, -skipped + 1, -1, 0, 1, scale - 1, scale,
                      2**k - skipped, 2**k - 1], dtype=np.int64)
    values = np.concatenate([np.tile(edges, 50), np.random.default_rng(1).integers(-2**k, 2**k, 2000),
                             np.tile(np.arange(-2 * skipped, 2 * skipped, 7), 2)])
    result, _ = run(protocol, values, bound_bits=k, divisor=scale)
    quotient = result - values // scale
    assert (result[values <= -skipped] == 0).all()
    assert set(quotient[values >= 0]) <= {0, 1}
    # Just below 0 the skipped bits would have decided: the value is let through or not, -1 or 0 either way.
    near = (values < 0) & (values > -skipped)
    assert set(result[near]) <= {-1, 0} and near.sum() > 1000


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
    # ... and every other number uniformly random among 1 ... p - 1 (random multipliers).
    others, prime = numbers[numbers != 0], prime_for(k)
    assert abs(others.mean() - prime / 2) < 0.5 and others.min() >= 1 and others.max() == prime - 1


def test_each_comparison_takes_the_smallest_prime_its_numbers_allow():
    """A comparison of k bits makes numbers from 0 to k + 1 (relu._compare_share): its modulus must be a prime
    above k + 1, so that no number but 0 is a multiple of it, and the smallest, so that packing.py puts the
    most numbers in a word. The exhaustive test below runs k = 1 ... 6 only; this holds for every k."""
    is_prime = lambda n: n > 1 and all(n % d for d in range(2, n))
    for k in range(1, WHOLE_RING + 1):
        prime = prime_for(k)
        assert is_prime(prime) and prime >= k + 2 and not any(is_prime(q) for q in range(k + 2, prime)), k
    assert (prime_for(16), prime_for(28)) == (19, 31)  # the clip's and the network's, as the docs say


@pytest.mark.parametrize("bound_bits", [0, 64])
def test_a_bound_outside_what_64_bit_words_hold_is_refused(bound_bits):
    with pytest.raises(ValueError, match="between 1 and 63"):
        relu(None, None, bound_bits)


def test_a_truncation_on_the_whole_ring_is_refused():
    with pytest.raises(ValueError, match="cannot be truncated"):
        relu(None, None, WHOLE_RING, divisor=SCALE)


WORD_EDGES = np.array([-2**63, -2**63 + 1, -2**62, -SCALE - 1, -1, 0, 1, SCALE - 1, SCALE, SCALE + 1, 2**62,
                       2**63 - 1], dtype=np.int64)


def test_exact_for_every_64_bit_word_on_the_whole_ring(protocol):
    # What a client running its own code may send: any word at all, read as a signed number.
    values = np.concatenate([np.tile(WORD_EDGES, 100),
                             np.random.default_rng(2).integers(-2**63, 2**63, 3000, dtype=np.int64)])
    result, _ = run(protocol, values, bound_bits=WHOLE_RING)
    np.testing.assert_array_equal(result, np.maximum(values, 0))


def test_clip_brings_every_64_bit_word_into_the_range_and_leaves_every_pixel_as_it_is(protocol):
    # Any word comes out as a pixel in [0, top]: its 16 lowest bits (top = 2^16 - 1). A pixel in [0, top],
    # the only kind an honest client sends, comes out unchanged, however it was shared.
    top = SCALE  # a pixel of 1 at the encoding's scale
    assert top == 2**16 - 1
    values = np.concatenate([np.tile(WORD_EDGES, 100), np.tile(np.arange(-5, top + 5), 2),
                             np.random.default_rng(3).integers(-2**63, 2**63, 3000, dtype=np.int64)])

    @tf.function
    def compute():
        y0, y1 = clip(protocol, shared(protocol, values), top).unwrapped
        return y0.value, y1.value

    share0, share1 = compute()
    result = share0.numpy() + share1.numpy()
    np.testing.assert_array_equal(result, np.clip(values & (2**16 - 1), 0, top))
    pixels = (values >= 0) & (values <= top)
    assert pixels.sum() >= top and (result[pixels] == values[pixels]).all()


def test_a_clip_to_a_top_short_of_a_power_of_two_less_one_is_refused():
    # Its one comparison leaves any value up to 2^m - 1: with a pixel of 1 at 3^10 = 59,049, a client running
    # its own code could send pixels up to 65,535 / 59,049 = 1.11, beyond what the value-range proof covers.
    with pytest.raises(ValueError, match="one less than a power of 2"):
        clip(None, None, 3**10)


def test_what_server2_sees_has_one_distribution_for_every_value_exhaustively_at_small_k():
    """The compare's privacy, checked case by case with relu.py's own ``_compare_share``, for k = 1 ... 6.

    server2's view of one value is r (it dealt r, and the split of r's bits) and the k numbers it
    rebuilds from the two servers' answers. Enumerated: beta, the rotation, every x in [-2^k, 2^k)
    and every r mod 2^(k+1) (its higher bits drawn: nobody sees them). For each case the common
    multiplier runs over all of 1 ... p-1 (p = prime_for(k), the smallest prime the comparison
    can use: a larger p only spreads the non-zero numbers wider), with the bits' split and the offsets drawn afresh
    each time; every entry must be 0 for every multiplier, or take each of 1 ... p-1 once.
    As the multipliers of relu() are drawn independently and uniformly for each entry, server2's
    numbers are then exactly: zeros where the pattern says, independent uniform non-zero numbers
    elsewhere. Patterns have at most one zero, so the view's distribution for (x, r) is exactly the
    histogram, over beta and the rotation, of where the zero is (or that there is none).

    Asserted: the sign derived is right in every case; for every (x, r) the histogram is the same,
    no zero k times and a zero at each place once, so one distribution for every x (with r known).
    The teeth: the same enumeration with the rotation fixed to 0 gives 2^k - 1 distributions over
    x (server2's view with r) and k over pairs (x, r); with beta fixed to 0, 2^k and 2.
    """
    generator = np.random.default_rng(2)
    for k in range(1, 7):
        grid = np.meshgrid(np.arange(2), np.arange(k), np.arange(-2**k, 2**k), np.arange(2**(k + 1)), indexing="ij")
        beta, rotation, x, r_low = (axis.ravel() for axis in grid)
        n = x.size
        r = r_low + generator.integers(-2**(62 - k), 2**(62 - k), n) * 2**(k + 1)  # any higher bits
        c = x + 2**k + r  # wraps modulo 2^64, as on the servers
        r_bits = relu_module._low_bits(tf.constant(r), k).numpy()
        prime = prime_for(k)  # the smallest prime above k + 1: 3, 5, 5, 7, 7, 11, as tight as it gets
        fixed = [tf.constant(beta, tf.int32), tf.constant(rotation, tf.int32)]

        def rebuilt(multiplier):
            """The k numbers server2 rebuilds in every case, with ``multiplier`` for every entry."""
            bits0 = generator.integers(0, prime, (n, k), dtype=np.int32)
            bits1 = (r_bits - bits0) % prime
            offsets = tf.constant(generator.integers(0, prime, (n, k), dtype=np.int32))
            multipliers = tf.fill((n, k), multiplier)
            answers = [relu_module._compare_share(party, tf.constant(bits), tf.constant(c), k, fixed[0],
                                                  multipliers, offsets, fixed[1]).numpy().astype(np.int32)
                       for party, bits in ((0, bits0), (1, bits1))]
            return (answers[0] + answers[1]) % prime

        numbers = rebuilt(1)
        zero = numbers == 0
        seen = np.zeros((n * k, prime), bool)
        for multiplier in range(1, prime):
            seen[np.arange(n * k), (numbers if multiplier == 1 else rebuilt(multiplier)).ravel()] = True
        assert (seen[:, 0] == zero.ravel()).all() and (seen[:, 1:] == ~zero.ravel()[:, None]).all(), k
        del seen

        has_zero = relu_module._zero_anywhere(tf.constant(numbers)).numpy()
        c_top, r_top = relu_module._bit(tf.constant(c), k).numpy(), relu_module._bit(tf.constant(r), k).numpy()
        np.testing.assert_array_equal(has_zero ^ beta ^ c_top ^ r_top, x >= 0, err_msg=f"k={k}")
        np.testing.assert_array_equal(has_zero, beta ^ (r_low % 2**k > c % 2**k), err_msg=f"k={k}")
        assert zero.sum(axis=1).max() <= 1, k
        place = np.where(has_zero == 1, zero.argmax(axis=1), k)  # k: no zero

        def distributions(selected):
            """How many distinct views: over values x (a map r -> histogram each), and over pairs (x, r)."""
            histogram = np.zeros((2**(k + 1), 2**(k + 1), k + 1), int)
            np.add.at(histogram, (x[selected] + 2**k, r_low[selected], place[selected]), 1)
            per_value = len(np.unique(histogram.reshape(2**(k + 1), -1), axis=0))
            return per_value, len(np.unique(histogram.reshape(-1, k + 1), axis=0)), histogram

        per_value, per_pair, histogram = distributions(np.ones(n, bool))
        assert (per_value, per_pair) == (1, 1), k
        assert (histogram[..., :k] == 1).all() and (histogram[..., k] == k).all(), k
        assert distributions(rotation == 0)[:2] == (2**k - 1, k), k
        assert distributions(beta == 0)[:2] == (2**k, 2), k
