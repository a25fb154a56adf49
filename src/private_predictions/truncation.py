"""Dividing shared values by the scale, with an opening that is uniformly random.

A product of two fixed-point numbers carries the scale D twice, and is divided by D once
("truncation"). Each server can divide its own share, but the shares wrap around 2^64, so the
servers open the value plus a random mask and correct for the wrap. tf-encrypted's truncation
draws that mask below 2^62: what it opens is only close to uniform (a statistical distance of
2^-19.8 per value), and when it is not, it tells server1 a bound on the value.

Here the mask r is uniform on all 64-bit words (to within 2^-64, see masking.py), so the opened
c = x + L + r is uniformly random, whatever x is; the wrap-around that a full mask causes is
corrected with two more shares that server2 deals with r: of r_q = floor(r / D), and of h = [r >= 2^63] * delta, where
delta = floor(2^64 / D) + [r mod D < 2^64 mod D]. With L a multiple of D and |x| < L (so that
2L < 2^63), lambda = [c < 2^63] and c_q = floor(c / D), read as unsigned numbers, give

    floor(x / D) + e = c_q - L / D - r_q + lambda * h,   e in {0, 1},

a stochastic rounding as tf-encrypted's. Why: let v = x + L in [0, 2L), and v + r = c + 2^64 w.
If w = 1, c < v < 2^63 and r > 2^64 - v > 2^63; if w = 0 and r >= 2^63, c >= r >= 2^63; so
w = lambda * [r >= 2^63], and floor((r - 2^64 w) / D) = r_q - w * delta. (The design and its
proof: Catrina and Saxena's TruncPr with a mask on the whole ring, as in the team's notes.)

The ReLU (relu.py) reads its truncation off its own opening, which already is x + 2^k + r;
values that reach no ReLU (the logits) are truncated here, with an opening of their own.
"""
from tf_encrypted.operations import secure_random
from tf_encrypted.protocol.pond.pond import PondPrivateTensor

from ._tf import tf
from .dealing import dealing_only, material
from .masking import WORDS, open_masked, uniform

# The words' types: the servers' shares are 64-bit; the tests also run the same code on 8-bit words.
UNSIGNED = {tf.int8: tf.uint8, tf.int16: tf.uint16, tf.int32: tf.uint32, tf.int64: tf.uint64}


def offset(bound_bits: int, divisor: int, word_bits: int = 64) -> int:
    """L: the smallest multiple of ``divisor`` at least 2^bound_bits (values lie in [-2^k, 2^k))."""
    offset = -(-2**bound_bits // divisor) * divisor
    if 2 * offset >= 2**(word_bits - 1):
        raise ValueError(f"values of {bound_bits} bits cannot be truncated by {divisor} on {word_bits}-bit words")
    return offset


def word(value: int, dtype):
    """A whole number modulo 2^bits as a word of ``dtype`` (two's complement)."""
    bits = dtype.size * 8
    value %= 2**bits
    return tf.constant(value - 2**bits if value >= 2**(bits - 1) else value, dtype)


def _unsigned_quotient(values, divisor: int):
    """floor(values / divisor), the words read as unsigned numbers."""
    unsigned = UNSIGNED[values.dtype]
    return tf.bitcast(tf.bitcast(values, unsigned) // tf.constant(divisor, unsigned), values.dtype)


def wrap_material(r, divisor: int):
    """server2's r_q and h for its mask r (see the module's docstring)."""
    ring = 2**(r.dtype.size * 8)
    unsigned = UNSIGNED[r.dtype]
    remainder = tf.bitcast(r, unsigned) % tf.constant(divisor, unsigned)
    delta = word(ring // divisor, r.dtype) + tf.cast(remainder < ring % divisor, r.dtype)
    return _unsigned_quotient(r, divisor), tf.cast(r < 0, r.dtype) * delta  # r < 0: r >= 2^(bits-1) unsigned


def quotient_parts(c, offset_: int, divisor: int):
    """What the opened c = x + offset + r tells both servers: floor(x / divisor) + e = public - r_q + lambda * h,
    with ``public`` = c_q - offset / divisor and ``lambda`` = [c < 2^(bits-1)], c read unsigned."""
    public = _unsigned_quotient(c, divisor) - word(offset_ // divisor, c.dtype)
    return public, tf.cast(c >= 0, c.dtype)


def quotient_share(party: int, parts, quotient_share_, wrap_share):
    """One server's share of floor(x / divisor) + e, from :func:`quotient_parts` of the opened c."""
    public, below_half = parts
    share = below_half * wrap_share - quotient_share_
    return share + public if party == 0 else share


def seeded_wrap_shares(seeds, shape):
    """server0's shares of r_q and h: grown from ``seeds["quotient"]`` and ``seeds["wrap"]``, which server2 drew."""
    return uniform(shape, seeds["quotient"], *WORDS), uniform(shape, seeds["wrap"], *WORDS)


def deal_wrap_material(r, divisor: int, seeds, shape, material=None):
    """On server2: server1's shares of r_q and h (``material``, if server2 computed them already), the rest of
    what :func:`seeded_wrap_shares` grows."""
    material = wrap_material(r, divisor) if material is None else material
    return tuple(whole - share for whole, share in zip(material, seeded_wrap_shares(seeds, shape)))


def truncate(protocol, x: PondPrivateTensor, bound_bits: int, divisor: int) -> PondPrivateTensor:
    """floor(x / divisor) + (0 or 1) on shares, for x known to lie in [-2^bound_bits, 2^bound_bits).

    One opening, of x + L + r for a uniform r: one message each way, as tf-encrypted's truncation.
    """
    shape = tuple(x.shape.as_list())
    shift = offset(bound_bits, divisor)
    servers = (protocol.server_0.device_name, protocol.server_1.device_name)
    with tf.name_scope("truncate-uniform"):
        def deal():
            """server2's r, as shares grown from seeds, and shares of r_q and h: server0's grown, server1's sent."""
            with tf.device(protocol.server_2.device_name):
                seeds = [{name: secure_random.secure_seed() for name in ("r", "quotient", "wrap")},
                         {"r": secure_random.secure_seed()}]
                r = uniform(shape, seeds[0]["r"], *WORDS) + uniform(shape, seeds[1]["r"], *WORDS)
                sent = deal_wrap_material(r, divisor, seeds[0], shape)
            kept = []
            for i, device in enumerate(servers):
                with tf.device(device):
                    kept.append({"r": uniform(shape, seeds[i]["r"], *WORDS),
                                 "wrap": seeded_wrap_shares(seeds[0], shape) if i == 0 else
                                 tuple(tf.identity(s) for s in sent)})
            return kept
        dealt = material(deal)
        if dealing_only():
            return x
        masked = []
        for i, (device, share) in enumerate(zip(servers, x.unwrapped)):
            with tf.device(device):
                masked.append(share.value + dealt[i]["r"] + (shift if i == 0 else 0))
        out = []
        for i, device in enumerate(servers):
            with tf.device(device):
                parts = quotient_parts(open_masked(protocol, *masked), shift, divisor)
                out.append(protocol.tensor_factory.tensor(quotient_share(i, parts, *dealt[i]["wrap"])))
    return PondPrivateTensor(protocol, out[0], out[1], x.is_scaled)
