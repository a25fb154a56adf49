"""Random masks the servers draw from seeds, and the one way a masked value is opened.

Every value that server0 and server1 open (rebuild from its two shares) is a secret plus a
uniformly random mask that neither of them knows alone: the opened value is then uniformly
random too, whatever the secret. (To within 2^-64: like tf-encrypted, ``uniform`` draws words
from [-2^63, 2^63 - 1), one word short of all of them.) Masks grow from seeds, so a share that
two servers must agree on costs a seed, not a message: equal seeds give equal random numbers.
"""
from tf_encrypted.operations import secure_random

from ._tf import tf

WORDS = (-2**63, 2**63 - 1)  # uniform 64-bit words, as tf-encrypted samples them


def uniform(shape, seed, low, high, dtype=tf.int64):
    """Numbers uniform in [low, high) grown from ``seed`` (the same on every server that holds it)."""
    return secure_random.seeded_random_uniform(shape, minval=low, maxval=high, dtype=dtype, seed=seed)


def open_masked(protocol, share0, share1):
    """A value rebuilt from its two shares: every value opened here is masked by fresh randomness."""
    return protocol._reconstruct(share0, share1)
