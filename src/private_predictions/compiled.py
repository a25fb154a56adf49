"""Functions compiled by XLA, under names that no other process gives its own.

A server keeps what XLA compiled for it by the function's name and its arguments' shapes, for every
process that ever runs functions on it, and TensorFlow names a traced function after the Python function
and a counter of the process that traced it. So a serving process started after another, on the same
servers, can give a function of its own the name of one the other compiled, with the same shapes and a
different body (another ReLU's, another server's part), and the server runs the other's: wrong answers,
and no error. (Seen: a serving side started again after a pulled cable answered 6 for a 7.) A name that
carries a random token of this process is never another process's.
"""
import functools
import uuid

from ._tf import tf

PROCESS = uuid.uuid4().hex[:12]  # this process's part of every compiled function's name


def compiled(function):
    """``function`` traced by tf.function and compiled by XLA; TensorFlow names each trace
    ``__inference_<its name>_<PROCESS>_<counter>``."""
    @functools.wraps(function)
    def named(*args, **kwargs):
        return function(*args, **kwargs)
    named.__name__ = f"{function.__name__}_{PROCESS}"
    return tf.function(named, jit_compile=True)
