"""Private predictions with TF Encrypted, in the shape of the Syft Keras workflow.

* model owner: ``LocalCluster.start()`` (or ``RemoteCluster.join()``), ``connect``, ``share_model``,
  ``cluster.admit``, ``SecureModel.serve``
* client: ``PrivateClient.connect()``, ``PrivateClient.predict``

Names are imported when first used, so that a client's machine, which has numpy and grpc
but no TensorFlow, can import the client (and the data and plots) from this package.
"""
import importlib
import os

# TensorFlow's C++ log lines (GPUs this machine lacks, CPU features) drown the story. TensorFlow reads
# this when it first logs, so importing this package before using TensorFlow is enough (notebook 01).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

_WHERE = {
    "InvalidImageError": "client", "NotAdmittedError": "client", "PrivateClient": "client",
    "RequestRefusedError": "client", "ServerSilentError": "client", "ServingStoppedError": "client", "softmax": "client",
    "ClusterError": "cluster", "LocalCluster": "cluster", "RemoteCluster": "cluster",
    "load_mnist": "data", "load_mnist_test": "data", "load_logits_model": "model", "VALUE_LIMIT": "protocol",
    "connect": "protocol",
    "SecureModel": "serving", "ServingConflictError": "serving", "share_model": "serving",
    "ServerUnreachableError": "watch",
}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
