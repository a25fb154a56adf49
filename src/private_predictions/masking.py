"""Random masks the servers draw from seeds, and the one way a masked 64-bit value is opened.

Every value that server0 and server1 open (rebuild from its two shares) is a secret plus a
uniformly random mask that neither of them knows alone: the opened value is then uniformly
random too, whatever the secret. (To within 2^-64: like tf-encrypted, ``uniform`` draws words
from [-2^63, 2^63 - 1), one word short of all of them.) Masks grow from seeds, so a share that
two servers must agree on costs a seed, not a message: equal seeds give equal random numbers.
"""
from tf_encrypted.operations import secure_random

from ._tf import tf
from .compiled import compiled
from .packing import digits, digits_per_draw

WORDS = (-2**63, 2**63 - 1)  # uniform 64-bit words, as tf-encrypted samples them


def uniform(shape, seed, low, high, dtype=tf.int64):
    """Numbers uniform in [low, high) grown from ``seed`` (the same on every server that holds it)."""
    return secure_random.seeded_random_uniform(shape, minval=low, maxval=high, dtype=dtype, seed=seed)


def small_uniform(shape, seed, base: int):
    """Numbers uniform in [0, base) of ``shape``, grown from ``seed``, several from each random draw.

    A draw uniform in [0, base^n) is n digits in base ``base``, independent and uniform: exactly, because
    the draw rejects the words beyond the largest multiple of its range instead of reducing them modulo it
    (a reduction would make the low top digits more likely). One draw costs about what a draw of one
    number does, so this takes several numbers from each instead of one (6 modulo 31). The last axis is cut
    into groups of n (the last group's unused digits are dropped).
    """
    *outer, last = shape
    per = digits_per_draw(base)
    draws = uniform(tuple(outer) + (-(-last // per),), seed, 0, base ** per, tf.int32)
    return _compiled_digits(draws, base, last)


_compiled_digits = compiled(digits)  # XLA divides by constants without dividing


def open_masked(protocol, share0, share1):
    """A value rebuilt from its two shares: every value opened here is masked by fresh randomness. (server2's
    numbers modulo a small prime are rebuilt where they are unpacked: relu._opened_numbers.)"""
    return protocol._reconstruct(share0, share1)
