"""ReLU on secret-shared values that are known to be small, in three message hops.

SecureNN's ReLU, as tf-encrypted 0.9.1 implements it, compares all 64 bits of every value and
takes two multiplications after its comparison. The values in our network are proven to stay
below 2^k in magnitude (value_range.py), so only their k lowest bits carry information, and the
helper server (server2), which ends the comparison, also ends the multiplication after it. What each
server sees:

* server0 and server1 open ``c = x + 2^k + r`` for a random ``r`` that server2 dealt: ``c`` is
  uniformly random to them, whatever ``x`` is;
* server2 receives, for each value, k numbers (k - t after a product, below) modulo a small prime
  that are either all non-zero or have exactly one zero, multiplied by random non-zero numbers,
  re-randomised and rotated by a random amount that only server0 and server1 know; whether a zero is
  there is XORed with a random bit that only server0 and server1 know. It learns nothing about ``x``;
* server2 sends server1 alone server1's shares of ``z`` (the comparison's bit, below) and of ``z * r``:
  each the whole less server0's share, which grows from a fresh seed of its own that server2 gave
  server0 and nobody else, so they are uniformly random to server1. Since ``x = (c - 2^k) - r`` with
  ``c`` public to server0 and server1, each of them computes its share of ``z * x = (c - 2^k) * z - z * r``
  on its own: no multiplication triple, no opening. With a divisor, the truncated value is
  ``P - r_q + lambda * h`` (truncation.py) and server2 sends shares of ``z``, ``z * r_q`` and ``z * h``;
  with a step (a public number let through), of ``z`` alone.

Since ``x + 2^k`` lies in [0, 2^(k+1)), ``x >= 0`` exactly when its bit k is 1. That bit is
bit k of ``c - r``: bit k of ``c``, XOR bit k of ``r``, XOR the borrow out of the lower k bits,
which is ``[r mod 2^k > c mod 2^k]``, the comparison of SecureNN's "private compare" (Wagh et
al. 2019, Algorithm 1), done here on k bits instead of 64.

A product at the double scale is divided by the scale on the way (``divisor``): the same
opening ``c`` gives the truncated value (truncation.py), so the ReLU needs no opening of its own
for it, and what is opened stays uniformly random.

With a divisor D, the comparison also skips the t lowest bits, for the largest 2^t <= D: the borrow
is read off bits t ... k-1 of c and r alone. It differs from the true borrow only where those bits
agree and the lower ones would have decided, that is where x mod 2^k lies within 2^t below 2^k. The
bound gets one bit of headroom (x lies in [-2^(k-1), 2^(k-1)) in the k used), so that happens only for
x in (-2^t, 0): such an x may be let through, and its quotient floor(x / D) + (0 or 1) is -1 or 0, one
unit of the encoding at most, as large as the truncation's own rounding. The proof of the value range
counts it (value_range._relu). Each compared value costs k - t numbers instead of k: 28 instead of 42
for the network's products.
"""
import numpy as np
from tf_encrypted.operations import secure_random
from tf_encrypted.protocol.pond.pond import PondPrivateTensor

from ._tf import tf
from .compiled import compiled
from .dealing import dealing_only, material
from .masking import WORDS, open_masked, small_uniform
from .masking import uniform as _uniform
from .packing import pack, unpack
from .truncation import (deal_wrap_material, offset, quotient_parts, quotient_share, seeded_wrap_shares, word,
                         wrap_material)


def prime_for(compared: int) -> int:
    """The modulus of a comparison of ``compared`` bits: the smallest prime above compared + 1.

    Its numbers run from 0 to compared + 1 (0 to 2 for a bit, plus the number of higher bits that differ),
    so no number but 0 is a multiple of it. The smaller the prime, the fewer bits each number takes on the
    wire (packing.py): 31 for the network's 28 bits, 5 bits each, 6 to a 32-bit word; 19 for the clip's 16.
    """
    prime = compared + 2
    while any(prime % divisor == 0 for divisor in range(2, int(prime ** 0.5) + 1)):
        prime += 1
    return prime


# With k = 63, x + 2^63 takes every 64-bit word once as x does: the comparison is right for every word.
WHOLE_RING = 63


def _low_bits(values, k):
    """Bits k-1 ... 0 of each 64-bit value, most significant first, as int32."""
    if k < 32:  # cut to k bits first: then every shift and mask below works on 32-bit words, half the bytes
        values, dtype = tf.cast(tf.bitwise.bitwise_and(values, 2**k - 1), tf.int32), tf.int32
    else:
        dtype = tf.int64
    shifts = tf.range(k - 1, -1, -1, dtype=dtype)
    return tf.cast(tf.bitwise.bitwise_and(tf.bitwise.right_shift(values[..., None], shifts), 1), tf.int32)


def _sums_above(numbers, k):
    """For each of the k numbers in a row, the sum of those before it (an exclusive prefix sum).

    As a product with a 0/1 matrix in float32: exact here (at most 62 numbers in [-66, 66], so every sum is
    below 2^13 in magnitude, and float32 holds whole numbers exactly up to 2^24), and several times faster
    than TensorFlow's cumsum on rows this short.
    """
    before = tf.constant(np.triu(np.ones((k, k), np.float32), 1))
    rows = tf.reshape(tf.cast(numbers, tf.float32), [-1, k])  # a matrix product needs rows, whatever the shape
    return tf.reshape(tf.cast(tf.matmul(rows, before), tf.int32), tf.shape(numbers))


def _bit(values, k):
    return tf.bitwise.bitwise_and(tf.bitwise.right_shift(values, k), 1)


def _zero_anywhere(numbers):
    """server2's one look at the comparison: does each row of k numbers hold a zero?"""
    return tf.cast(tf.reduce_any(tf.equal(numbers, 0), axis=-1), tf.int64)


def _compare_share(party, bits, c, k, beta, multipliers, offsets, rotation):
    """One server's part of SecureNN's private compare of its bits' number with the public c mod 2^k.

    Reconstructed, the k numbers it returns (with the other server's) hold one zero exactly when
    ``beta`` XOR ``[shared number > c mod 2^k]`` is 1, and are non-zero everywhere else. (With c and the
    shared number's bits both shifted right first, it compares the bits above the shift only.)
    """
    low = _low_bits(c, k)
    c_low = tf.bitwise.bitwise_and(c, 2**k - 1)
    next_up = _low_bits(c_low + 1, k)  # c + 1 mod 2^k
    largest = tf.equal(c_low, 2**k - 1)[..., None]

    def differs_above(public):  # the shared bits XOR the public ones, summed over the higher bits
        xor = bits * (1 - 2 * public) + party * public
        return _sums_above(xor, k)

    when_zero = party * (low + 1) - bits + differs_above(low)  # zero where bits > c first shows
    when_one = bits + party * (1 - next_up) + differs_above(next_up)  # zero where bits < c + 1 shows
    # If c mod 2^k is the largest k-bit number, "bits < c + 1" always holds: one zero, by construction.
    always = party * tf.concat([tf.zeros_like(low[..., :1]), tf.ones_like(low[..., 1:])], axis=-1)
    chosen = tf.where(tf.cast(beta, tf.bool)[..., None], tf.where(largest, always, when_one), when_zero)
    masked = (multipliers * chosen + (offsets if party == 0 else -offsets)) % prime_for(k)
    positions = (tf.range(k, dtype=tf.int32) + rotation[..., None]) % k
    return tf.gather(masked, positions, batch_dims=len(masked.shape) - 1)


def _answer(party, bits, c, k, beta, masks, rotation):
    """:func:`_compare_share`, packed for server2 (packing.py), with each number's multiplier and offset read
    off one draw ``masks`` in [0, (p - 1) * p), p = prime_for(k): 1 + masks // p and masks % p are then
    independent and uniform in 1 ... p - 1 and 0 ... p - 1, for one random number drawn instead of two."""
    prime = prime_for(k)
    # Dealt in the narrowest words that hold them (kept ahead, they take a quarter or half the memory): int32
    # from here on, in the compiled pass that reads them anyway.
    bits, beta, masks, rotation = (tf.cast(value, tf.int32) for value in (bits, beta, masks, rotation))
    return pack(_compare_share(party, bits, c, k, beta, 1 + masks // prime, masks % prime, rotation), prime)


def _bits_share(r, share0, k):
    """server1's shares modulo p of r's k low bits, given server0's (each bit minus server0's share), packed."""
    prime = prime_for(k)
    difference = _low_bits(r, k) - share0
    return pack(tf.where(difference < 0, difference + prime, difference), prime)  # > -prime


def _opened_numbers(answer0, answer1, k):
    """server2's k numbers per value: the two servers' packed numbers, unpacked, added, modulo p."""
    prime = prime_for(k)
    opened = unpack(answer0, prime, k) + unpack(answer1, prime, k)  # server2's one opening: not a 64-bit word
    return tf.where(opened >= prime, opened - prime, opened)  # a sum of two numbers below p


# XLA compiles the comparison's thirty-odd steps on k numbers per value into a few passes over memory, on
# the server that calls it: several times faster than running them one TensorFlow op at a time.
_compiled_answer = compiled(_answer)
_compiled_opened_numbers = compiled(_opened_numbers)  # on server2: one pass
_compiled_bits_share = compiled(_bits_share)  # on server2, as it deals
_compiled_unpack = compiled(unpack)  # on server1, what server2 dealt it


def relu(protocol, x: PondPrivateTensor, bound_bits: int, divisor: int = 1, step: int = 0):
    """max(x / divisor, 0) on shares, given that x lies in [-2^bound_bits, 2^bound_bits).

    With ``divisor`` > 1 (a product at the double scale), the result is floor(x / divisor) + 0 or 1
    where x >= 0, read off the comparison's own opening, and 0 where x < 0, except that an x within
    2^t of 0 (the largest 2^t <= divisor) may be let through too: -1 or 0. With ``bound_bits`` =
    WHOLE_RING (63) and no divisor, x may be any 64-bit word, read as a signed number. With ``step``, the
    result is ``step`` where x >= 0 and 0 elsewhere (the same comparison, letting a public number through
    instead of x); each server's share of it is then ``step`` times a word, uniformly random among those
    multiples (clip subtracts it from shares of 16 bits, which are no more uniform).
    """
    k = bound_bits
    if not 1 <= k <= WHOLE_RING:
        raise ValueError(f"bound_bits must be between 1 and {WHOLE_RING}, not {k}")
    if step and divisor > 1:
        raise ValueError("a step lets a public number through: there is nothing to divide")
    skipped = 0  # the bits below the divisor, which the comparison skips (the module's docstring)
    if divisor > 1:
        k += 1  # headroom: only x in (-2^t, 0) can then be read as >= 0
        skipped = min(divisor.bit_length() - 1, k - 1)
    compared = k - skipped
    prime = prime_for(compared)
    shift = offset(k, divisor) if divisor > 1 else None  # raises if 64-bit words cannot hold it
    shape = tuple(x.shape.as_list())
    servers = (protocol.server_0.device_name, protocol.server_1.device_name)
    helper = protocol.server_2.device_name
    # What the ReLU lets through where x >= 0, y, is public - (the sum of coefficient * hidden) for a public
    # number that server0 and server1 both compute from c, and hidden numbers that server2 dealt (the
    # module's docstring): x = (c - 2^k) - r; floor(x / divisor) + e = (c'_q - L / D) - r_q + lambda * h,
    # with c' = c + L - 2^k (truncation.quotient_parts); a step, public alone. After the comparison server2
    # deals shares of z and of z times each hidden number.
    hidden = () if step else ("r",) if shift is None else ("r_q", "h")
    with tf.name_scope("bounded-relu"):
        # server2 deals: a random r and the low bits of r shared modulo p (and r_q, h to truncate); after
        # the comparison, shares of z and of z times each hidden number. server0's shares grow from seeds,
        # on server0 and on server2; a seed never serves two purposes (equal seeds give equal random numbers).
        products = tuple(f"z*{name}" for name in hidden)

        def deal():
            """Everything random in this ReLU, made before the query if it can be (dealing.py): what server2
            keeps, and what server0 and server1 keep (their shares, and their common randomness)."""
            with tf.device(helper):
                seeds = [{name: secure_random.secure_seed()
                          for name in ("r", "bits", "z") + products + (("quotient", "wrap") if shift else ())},
                         {"r": secure_random.secure_seed()}]
                r = sum(_uniform(shape, seeds[i]["r"], *WORDS) for i in range(2))
                bits0 = small_uniform(shape + (compared,), seeds[0]["bits"], prime)  # server0's, grown there too
                bits1 = _compiled_bits_share(tf.bitwise.right_shift(r, skipped), bits0, compared)
                known = {"r": r}
                if shift is not None:
                    known["r_q"], known["h"] = wrap_material(r, divisor)
                    wrap1 = deal_wrap_material(r, divisor, seeds[0], shape, (known["r_q"], known["h"]))
                # server0's shares of z and of z times each hidden number, which server2 takes off its answer.
                kept_by_helper = {"r_top": _bit(r, k), "known": [known[name] for name in hidden],
                                  "grown": [_uniform(shape, seeds[0][name], *WORDS) for name in ("z",) + products]}
            # server0 and server1 draw their common randomness from seeds that server2 never sees.
            with tf.device(servers[0]):
                common = {name: secure_random.secure_seed() for name in ("beta", "masks", "rotation")}
            kept = []
            for i, device in enumerate(servers):
                with tf.device(device):
                    # The small numbers in words of 8 or 16 bits (_answer): prime < 2^7, (prime - 1) * prime < 2^15.
                    held = {"r": _uniform(shape, seeds[i]["r"], *WORDS),
                            "beta": tf.cast(_uniform(shape, common["beta"], 0, 2, tf.int32), tf.int8),
                            "masks": tf.cast(small_uniform(shape + (compared,), common["masks"], (prime - 1) * prime),
                                             tf.int16),
                            "rotation": tf.cast(_uniform(shape, common["rotation"], 0, compared, tf.int32), tf.int8)}
                    if i == 0:
                        held["bits"] = tf.cast(small_uniform(shape + (compared,), seeds[0]["bits"], prime), tf.int8)
                        held["z"] = [_uniform(shape, seeds[0][name], *WORDS) for name in ("z",) + products]
                        if shift is not None:
                            held["wrap"] = seeded_wrap_shares(seeds[0], shape)
                    else:
                        held["bits"] = tf.cast(_compiled_unpack(tf.identity(bits1), prime, compared), tf.int8)
                        if shift is not None:
                            held["wrap"] = tuple(tf.identity(share) for share in wrap1)
                    kept.append(held)
            return kept + [kept_by_helper]
        *dealt, by_helper = material(deal)
        if dealing_only():
            return x
        x_shares = [s.value for s in x.unwrapped]
        opened_c = []
        for i, device in enumerate(servers):
            with tf.device(device):
                opened_c.append(x_shares[i] + dealt[i]["r"] + (word(2**k, tf.int64) if i == 0 else 0))
        answers, flips, c_opened = [], [], []
        for i, device in enumerate(servers):
            with tf.device(device):
                c = open_masked(protocol, *opened_c)
                c_opened.append(c)
                answers.append(_compiled_answer(i, dealt[i]["bits"], tf.bitwise.right_shift(c, skipped), compared,
                                                dealt[i]["beta"], dealt[i]["masks"], dealt[i]["rotation"]))
                flips.append(tf.bitwise.bitwise_xor(_bit(c, k), tf.cast(dealt[i]["beta"], tf.int64)))
        with tf.device(helper):
            numbers = _compiled_opened_numbers(*[tf.identity(answer) for answer in answers], compared)
            z = tf.bitwise.bitwise_xor(_zero_anywhere(numbers), by_helper["r_top"])
            # server1's shares of z and of z times each hidden number: what server2 knows, less server0's.
            wholes = [z] + [z * known for known in by_helper["known"]]
            answer = tf.stack([whole - share for whole, share in zip(wholes, by_helper["grown"])])
        out = []
        for i, device in enumerate(servers):
            with tf.device(device):
                z_shares = dealt[0]["z"] if i == 0 else tf.unstack(tf.identity(answer))
                c = c_opened[i]
                if step:
                    public, coefficients = word(step, tf.int64), ()
                    y_share = tf.fill(tf.shape(x_shares[i]), word(step if i == 0 else 0, tf.int64))
                elif shift is None:
                    public, coefficients = c - word(2**k, tf.int64), (1,)
                    y_share = x_shares[i]
                else:
                    parts = quotient_parts(c + (shift - 2**k), shift, divisor)  # once: y's share and z * y's
                    public, coefficients = parts[0], (1, -parts[1])
                    y_share = quotient_share(i, parts, *dealt[i]["wrap"])
                # z * y = public * z - the sum of coefficient * (z times a hidden number): no opening needed.
                zy = public * z_shares[0] - sum(factor * share for factor, share in zip(coefficients, z_shares[1:]))
                out.append(protocol.tensor_factory.tensor(tf.where(tf.equal(flips[i], 1), y_share - zy, zy)))
    return PondPrivateTensor(protocol, out[0], out[1], x.is_scaled)


def clip(protocol, x: PondPrivateTensor, top: int) -> PondPrivateTensor:
    """A pixel in [0, top] whatever 64-bit word x is, and x itself when it is in [0, top] already.

    The client's own check (pixels in [0, 1]) binds only clients that run the series' code; the value-range
    proof, and with it what answers reveal of the weights, holds for images in [0, top] only. ``top`` is
    2^m - 1 (a pixel of 1 at the encoding's scale, protocol.py). Each server keeps the m lowest bits of its
    share, on its own: their sum y lies in [0, 2^(m+1)) and is x modulo 2^m, or that plus 2^m. One
    comparison of m bits takes the 2^m off: y - 2^m [y >= 2^m] is x modulo 2^m, in [0, 2^m - 1] = [0, top],
    and x itself for every pixel an honest client sends. (With a top short of 2^m - 1, a second comparison
    would have to clip what lies above it; a clip of any word read as a signed number would need two of 63.)
    Each server's share of the result is its m low bits less its share of the step, a uniformly random
    multiple of 2^m (relu): uniformly random above its m low bits, which are its own input share's, as
    it already knew; the next value opened (a product's, product.py) is masked afresh.
    """
    m = top.bit_length()
    if top != 2**m - 1:
        raise ValueError(f"the clip keeps pixels in [0, 2^m - 1]: {top} is not one less than a power of 2 "
                         "(protocol.FIXED_POINT's scale must be)")
    servers = (protocol.server_0.device_name, protocol.server_1.device_name)

    def shares_of(make):
        """A private value whose share on server i is ``make(i)``, computed there (no message)."""
        shares = []
        for i, device in enumerate(servers):
            with tf.device(device):
                shares.append(protocol.tensor_factory.tensor(make(i)))
        return PondPrivateTensor(protocol, *shares, x.is_scaled)

    with tf.name_scope("clip"):
        held = [share.value for share in x.unwrapped]
        low = shares_of(lambda i: tf.bitwise.bitwise_and(held[i], 2**m - 1))  # their sum is y
        below = shares_of(lambda i: low.unwrapped[i].value - (2**m if i == 0 else 0))  # y - 2^m
        return protocol.sub(low, relu(protocol, below, m, step=2**m))  # y - 2^m [y >= 2^m]
