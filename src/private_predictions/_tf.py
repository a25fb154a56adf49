"""Import TensorFlow and TF Encrypted once, quietly, on the one stack they work on.

Everything in the package goes through here, so the checks below run before any
secret is made.
"""
import linecache
import logging
import os
import sys
import tempfile
import types

# TF's C++ log lines (CPU features, gRPC channels, functions it could not register on a
# server that has just been stopped) drown the story; errors still come through as exceptions.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if sys.version_info[:2] not in {(3, 8), (3, 9), (3, 10)}:
    raise ImportError(
        f"private_predictions needs Python 3.8-3.10 (tf-encrypted 0.9.1 runs on "
        f"tensorflow 2.9.1 only); this is Python {sys.version.split()[0]}. "
        "Run `make setup` from the repository root: it finds or explains how to "
        "install Python 3.10."
    )

import tensorflow as tf  # noqa: E402
from tensorflow.python.autograph.pyct import loader as _autograph_loader  # noqa: E402


def _load_source_leaving_no_file(source, delete_on_exit):
    """Autograph's loader, without the file it writes in the temporary folder.

    Autograph writes each function it converts to ``__autograph_generated_file*.py`` there and removes it
    only at a clean exit: every process killed (a kernel shut down by nbval, a serving process ended by a
    test or a teacher) left its files, hundreds a day. Removing the file once loaded still left one when a
    process was killed between the two. So nothing is written: the module is compiled from the source,
    under the name autograph would have given its file, and the source is kept in ``linecache``, so
    tracebacks and ``inspect`` still show it.
    """
    while True:
        module_name = f"__autograph_generated_file{os.urandom(4).hex()}"
        if module_name not in sys.modules:
            break
    file_name = os.path.join(tempfile.gettempdir(), f"{module_name}.py")  # a name only: never created
    linecache.cache[file_name] = (len(source), None, source.splitlines(True), file_name)
    module = types.ModuleType(module_name)
    module.__file__ = file_name
    exec(compile(source, file_name, "exec"), module.__dict__)  # noqa: S102 - autograph's own generated code
    sys.modules[module_name] = module
    return module, file_name


_autograph_loader.load_source = _load_source_leaving_no_file

REQUIRED_TF = "2.9.1"
if tf.__version__ != REQUIRED_TF:
    raise ImportError(
        f"tf-encrypted 0.9.1 ships its secure-randomness op compiled for "
        f"tensorflow=={REQUIRED_TF}, but tensorflow {tf.__version__} is installed. "
        f"Install the pinned versions: pip install -r requirements.txt"
    )

# tf-encrypted logs a warning and silently switches to a predictable generator if
# its op fails to load; we want to hear about it as an error instead.
logging.getLogger("tf_encrypted").setLevel(logging.ERROR)

import tf_encrypted as tfe  # noqa: E402
from tf_encrypted.operations import secure_random  # noqa: E402

# SecureNN's average pooling still calls the TF1 name on even-sized inputs.
if not hasattr(tf, "Dimension"):
    tf.Dimension = tf.compat.v1.Dimension


class InsecureRandomnessError(RuntimeError):
    """tf-encrypted would fall back to a predictable random generator."""


def require_secure_randomness():
    """Refuse to go on if the secure-randomness op did not load.

    Secret shares drawn from a predictable generator are no secret at all, and
    tf-encrypted only logs a warning when that happens.
    """
    if not secure_random.supports_secure_randomness():
        raise InsecureRandomnessError(
            "tf-encrypted's secure-randomness op did not load, so secret shares "
            "would be predictable. It is compiled for tensorflow=="
            f"{REQUIRED_TF} only (found {tf.__version__}); reinstall the pinned "
            "versions with: pip install -r requirements.txt"
        )


require_secure_randomness()

__all__ = ["tf", "tfe", "require_secure_randomness", "InsecureRandomnessError"]
