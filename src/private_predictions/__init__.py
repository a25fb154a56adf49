"""Private predictions with TF Encrypted, in the shape of the Syft Keras workflow.

* model owner: ``LocalCluster.start()`` (or ``RemoteCluster.join()``), ``connect``, ``share_model``,
  ``SecureModel.serve``
* client: ``PrivateClient.connect()``, ``PrivateClient.predict``
"""
from .client import InvalidImageError, PrivateClient, RequestRefusedError, ServingStoppedError, softmax
from .cluster import ClusterError, LocalCluster, RemoteCluster
from .data import load_mnist
from .model import load_logits_model
from .protocol import connect
from .serving import SecureModel, ServingConflictError, share_model
from .watch import ServerUnreachableError

__all__ = [
    "ClusterError", "InvalidImageError", "LocalCluster", "PrivateClient", "RemoteCluster", "RequestRefusedError",
    "SecureModel", "ServerUnreachableError", "ServingConflictError", "ServingStoppedError", "connect",
    "load_logits_model", "load_mnist", "share_model", "softmax",
]
