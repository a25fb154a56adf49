"""packing.py: numbers below a small base, several to a 32-bit word, and back, with nothing lost."""
import numpy as np
import pytest

from private_predictions._tf import tf
from private_predictions.packing import pack, per_word, unpack, words_for


@pytest.mark.parametrize("base", [3, 19, 31, 67, 930])
def test_packed_numbers_come_back_from_words_that_hold_as_many_as_fit(base):
    count = 29  # not a multiple of any per_word: the last word is partly filled
    numbers = np.random.default_rng(base).integers(0, base, (50, 2, count))
    numbers[0], numbers[1] = base - 1, 0  # the largest words, and the smallest
    words = pack(tf.constant(numbers, tf.int32), base).numpy()
    assert words.dtype == np.int32 and words.shape == (50, 2, words_for(count, base)) and (words >= 0).all()
    np.testing.assert_array_equal(unpack(tf.constant(words), base, count).numpy(), numbers)
    assert base ** per_word(base) < 2**31 <= base ** (per_word(base) + 1)  # as many as an int32 holds
