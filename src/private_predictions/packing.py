"""Numbers below a small base, several to a 32-bit word: n numbers below b are one number below b^n.

Two uses: a random draw below b^n is n independent, uniform numbers below b (masking.small_uniform),
and n numbers below b sent as one word take 4 bytes instead of n (the comparison's numbers, relu.py).
"""
from ._tf import tf


def per_word(base: int) -> int:
    """How many numbers below ``base`` one int32 word holds: the largest n with base^n < 2^31."""
    n = 1
    while base ** (n + 1) < 2**31:
        n += 1
    return n


def words_for(count: int, base: int) -> int:
    """How many words ``count`` numbers below ``base`` take."""
    return -(-count // per_word(base))


def _powers(base: int):
    return tf.constant([base ** j for j in range(per_word(base))], tf.int32)


def pack(numbers, base: int):
    """The numbers on the last axis (each in [0, base)) as int32 words, ``per_word(base)`` to a word, the first
    least significant; the last word is filled up with zeros. Every word stays below base^n < 2^31."""
    per = per_word(base)
    *outer, count = numbers.shape.as_list()
    words = words_for(count, base)
    padded = tf.pad(tf.cast(numbers, tf.int32), [[0, 0]] * len(outer) + [[0, words * per - count]])
    return tf.reduce_sum(tf.reshape(padded, outer + [words, per]) * _powers(base), axis=-1)


def unpack(words, base: int, count: int):
    """The first ``count`` numbers below ``base`` that :func:`pack` put into ``words`` (or that a draw below
    base^n holds), side by side on the last axis, as int32."""
    per = per_word(base)
    digits = tf.math.floormod(tf.math.floordiv(words[..., None], _powers(base)), base)
    return tf.reshape(digits, words.shape[:-1] + (words.shape[-1] * per,))[..., :count]
