"""Several small numbers in one 32-bit word, two ways.

* On the wire, numbers below a limit are bit fields: numbers modulo 31 take 5 bits each, 6 to a word,
  so a comparison's 28 numbers travel in 20 bytes instead of 28 (relu.py). Shifts and masks unpack them.
  Words stay below 2^31, non-negative as int32.
* From a random draw, n numbers below b are the n digits in base b of a draw below b^n: independent and
  uniform (masking.small_uniform). Digits need divisions, so the wire does not use them.
"""
import numpy as np

from ._tf import tf


def fields_per_word(limit: int) -> int:
    """How many numbers below ``limit`` one word holds as bit fields, within its 31 lowest bits."""
    return 31 // (limit - 1).bit_length()


def words_for(count: int, limit: int) -> int:
    """How many words ``count`` numbers below ``limit`` take as bit fields."""
    return -(-count // fields_per_word(limit))


def _shifts(limit: int):
    width = (limit - 1).bit_length()
    return tf.constant([width * j for j in range(fields_per_word(limit))], tf.int32)


def pack(numbers, limit: int):
    """The numbers on the last axis (each in [0, limit)) as int32 words of bit fields, the first in the lowest
    bits; the last word is filled up with zeros.

    As a product with a matrix of powers of 2 in float64: exact (the fields do not overlap, so the sum is
    their bitwise or, and every word is below 2^31, well within float64's 2^53), and under XLA nearly free
    where shifting and summing the fields took a third of the comparison's time.
    """
    per, width = fields_per_word(limit), (limit - 1).bit_length()
    *outer, count = numbers.shape.as_list()
    powers = np.zeros((count, words_for(count, limit)))
    for i in range(count):
        powers[i, i // per] = 2.0 ** (width * (i % per))
    words = tf.matmul(tf.reshape(tf.cast(numbers, tf.float64), [-1, count]), tf.constant(powers))
    return tf.reshape(tf.cast(words, tf.int32), outer + [powers.shape[1]])


def unpack(words, limit: int, count: int):
    """The first ``count`` numbers that :func:`pack` put into ``words``, side by side on the last axis, as int32."""
    mask = 2 ** (limit - 1).bit_length() - 1
    fields = tf.bitwise.bitwise_and(tf.bitwise.right_shift(words[..., None], _shifts(limit)), mask)
    return tf.reshape(fields, words.shape[:-1] + (words.shape[-1] * fields_per_word(limit),))[..., :count]


def digits_per_draw(base: int) -> int:
    """How many digits in base ``base`` one draw below 2^31 holds: the largest n with base^n < 2^31."""
    n = 1
    while base ** (n + 1) < 2**31:
        n += 1
    return n


def digits(draws, base: int, count: int):
    """The first ``count`` digits in base ``base`` of ``draws`` (each below base^n, n = digits_per_draw(base)),
    least significant first, side by side on the last axis, as int32."""
    powers = tf.constant([base ** j for j in range(digits_per_draw(base))], tf.int32)
    found = tf.math.floormod(tf.math.floordiv(draws[..., None], powers), base)
    return tf.reshape(found, draws.shape[:-1] + (draws.shape[-1] * digits_per_draw(base),))[..., :count]
