"""The servers' truncation (truncation.py): floor(x / D) or one more, and an opening that is uniformly random."""
import contextlib
import functools
from types import SimpleNamespace

import numpy as np
import pytest
from tf_encrypted.protocol.pond.pond import Pond, PondPrivateTensor

import private_predictions.truncation as truncation_module
from private_predictions import connect
from private_predictions._tf import tf
from private_predictions.protocol import FIXED_POINT
from private_predictions.truncation import offset, quotient_parts, quotient_share, truncate, wrap_material

SCALE, K = FIXED_POINT.scaling_factor, 42  # the network's divisor and the bound of its products (2^42 > 729 * 3^20)


def combine(x, r, divisor, k, dtype):
    """floor(x / divisor) + e as the two servers compute it from truncation.py's pieces, for masks r, and c."""
    bits = dtype.size * 8
    words = lambda values: tf.constant(((values + 2**(bits - 1)) % 2**bits - 2**(bits - 1)).astype(np.int64), tf.int64)
    shift = offset(k, divisor, bits)
    r_quotient, wrap = wrap_material(tf.cast(words(r), dtype), divisor)
    generator = np.random.default_rng(0)
    split = [tf.cast(words(generator.integers(0, 2**bits, np.shape(x), dtype=np.uint64).astype(object)), dtype)
             for _ in range(2)]
    c_words = np.array([(int(a) + shift + int(b)) % 2**bits for a, b in zip(np.ravel(x), np.ravel(r))], dtype=object)
    c = tf.cast(words(c_words.reshape(np.shape(x))), dtype)
    parts = quotient_parts(c, shift, divisor)
    y = quotient_share(0, parts, split[0], split[1]) + quotient_share(1, parts, r_quotient - split[0], wrap - split[1])
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
        y, _ = combine(x, r, divisor, k, tf.int8)
        assert set(y - np.floor_divide(x, divisor)) <= {0, 1}, (divisor, k)
        # combine's c is this test's own x + L + r: what truncate() itself opens is checked below.


class _Parties:
    """truncation.py's ``tf`` with its device scopes read as the server they name (no TensorFlow device here)."""

    def __init__(self):
        self.where = []

    def __getattr__(self, name):
        return getattr(tf, name)

    @contextlib.contextmanager
    def device(self, name):
        self.where.append(name)
        try:
            yield
        finally:
            self.where.pop()


def truncate_on_8_bit_words(x, k, divisor, masks):
    """truncation.py's own ``truncate`` on 8-bit words, run here: server2's seeds are numbered in the order
    it draws them, and the mask grown from seed j (on whichever server) is ``masks(j)``, 8-bit words of x's
    shape; what each server opens is recorded. Returns floor(x / divisor) + e, [(server, seed) for each mask
    grown] and {server: what it opened}."""
    parties, drawn, grown, opened = _Parties(), [], [], {}

    def secure_seed(*args, **kwargs):
        drawn.append(len(drawn))
        return drawn[-1]

    def uniform(shape, seed, low, high, dtype=None):
        grown.append((parties.where[-1], seed))
        return masks(seed)

    def open_masked(protocol, share0, share1):
        value = original_open(protocol, share0, share1)
        opened[parties.where[-1]] = value.numpy()
        return value

    original_open = truncation_module.open_masked
    protocol = SimpleNamespace(**{f"server_{i}": SimpleNamespace(device_name=f"server{i}") for i in range(3)},
                               tensor_factory=SimpleNamespace(tensor=lambda value: SimpleNamespace(value=value)),
                               _reconstruct=functools.partial(Pond._reconstruct, None))
    share0 = np.random.default_rng(3).integers(-128, 128, x.shape)
    x_shares = [tf.constant(share, tf.int8) for share in (share0, (x - share0 + 128) % 256 - 128)]
    secret = SimpleNamespace(shape=tf.TensorShape(x.shape), unwrapped=[SimpleNamespace(value=s) for s in x_shares],
                             is_scaled=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(truncation_module, "tf", parties)
        patch.setattr(truncation_module, "secure_random", SimpleNamespace(secure_seed=secure_seed))
        patch.setattr(truncation_module, "uniform", uniform)
        patch.setattr(truncation_module, "open_masked", open_masked)
        patch.setattr(truncation_module, "PondPrivateTensor", lambda protocol, y0, y1, scaled: (y0.value, y1.value))
        y0, y1 = truncate(protocol, secret, k, divisor)
    y = (y0.numpy().astype(np.int64) + y1.numpy() + 128) % 256 - 128
    return y, grown, opened


@pytest.mark.parametrize("divisor", [2, 3, 5, 7, 10, 16, 27])
def test_what_truncate_opens_takes_every_word_once_over_a_mask_the_opener_does_not_hold(divisor):
    """truncate() itself on 8-bit words. Each opener (server0, server1) holds the masks it grows from its
    seeds; for some mask it does not hold, what it opens takes each of the 256 words once as that mask runs
    over every word, for every value x and every choice of the masks it holds: c is uniform to it, whatever x
    is. And for every x and every such mask (so every r), the result is floor(x / D) or one more.

    Where server2 draws one seed for both halves of r (r = 2 r0, server0 holds r0), no mask that server0
    lacks reaches c: for each x, c is one word."""
    fixed = np.random.default_rng(4)
    for k in range(1, 7):
        try:
            offset(k, divisor, 8)
        except ValueError:
            continue  # 2L must stay below 2^7
        shape = (2**(k + 1), 16, 256)  # x; masks the opener holds, 16 choices; a mask it does not, every word
        x, held, other = (np.broadcast_to(axis.reshape([-1 if i == d else 1 for i in range(3)]), shape)
                          for d, axis in enumerate((np.arange(-2**k, 2**k), np.arange(0, 256, 17), np.arange(256))))
        _, grown, _ = truncate_on_8_bit_words(x, k, divisor, lambda seed: tf.zeros(shape, tf.int8))
        for opener in ("server0", "server1"):
            holds = {seed for where, seed in grown if where == opener}
            lacks = sorted({seed for _, seed in grown} - holds)
            uniform_over = []
            for running in lacks:  # the masks it lacks, each in turn over every word (the others fixed)
                masks = {seed: held + 37 * seed for seed in holds}  # a word per choice, another for each seed
                masks.update({seed: other if seed == running else fixed.integers(0, 256, shape) for seed in lacks})
                words = {seed: tf.constant((mask + 128) % 256 - 128, tf.int8) for seed, mask in masks.items()}
                y, _, opened = truncate_on_8_bit_words(x, k, divisor, words.__getitem__)
                assert set(np.unique(y - np.floor_divide(x, divisor))) <= {0, 1}, (divisor, k, opener, running)
                c = opened[opener].astype(np.uint8).reshape(-1, 256)
                if (np.sort(c, axis=1) == np.arange(256)).all():
                    uniform_over.append(running)
                    break
            assert uniform_over, f"{opener} holds the seeds of every mask that reaches what it opens " \
                                 f"(it grows {sorted(holds)}; it lacks {lacks}): divisor {divisor}, k {k}"


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
