"""packing.py: small numbers in 32-bit words, as bit fields for the wire and as the digits of a random draw."""
import numpy as np
import pytest

from private_predictions._tf import tf
from private_predictions.packing import digits, digits_per_draw, fields_per_word, pack, unpack, words_for


@pytest.mark.parametrize("limit", [3, 16, 19, 31, 67])
def test_numbers_packed_as_bit_fields_come_back_from_words_that_hold_as_many_as_fit(limit):
    count = 29  # not a multiple of any fields_per_word: the last word is partly filled
    numbers = np.random.default_rng(limit).integers(0, limit, (50, 2, count))
    numbers[0], numbers[1] = limit - 1, 0  # every bit of every field set, and none
    words = pack(tf.constant(numbers, tf.int32), limit).numpy()
    assert words.dtype == np.int32 and words.shape == (50, 2, words_for(count, limit)) and (words >= 0).all()
    np.testing.assert_array_equal(unpack(tf.constant(words), limit, count).numpy(), numbers)
    width = (limit - 1).bit_length()
    assert fields_per_word(limit) * width <= 31 < (fields_per_word(limit) + 1) * width  # as many as fit


@pytest.mark.parametrize("base", [19, 31, 930, 4422])
def test_the_digits_of_a_draw_are_its_digits_in_the_base(base):
    per = digits_per_draw(base)
    assert base ** per < 2**31 <= base ** (per + 1)  # as many as a draw below 2^31 holds
    draws = np.random.default_rng(base).integers(0, base ** per, (1000, 3))
    draws[0] = base ** per - 1
    expected = (draws[..., None] // base ** np.arange(per)) % base  # least significant first
    found = digits(tf.constant(draws, tf.int32), base, 3 * per - 1).numpy()
    np.testing.assert_array_equal(found, expected.reshape(1000, 3 * per)[:, :-1])
