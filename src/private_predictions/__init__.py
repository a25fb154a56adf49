"""Private predictions with TF Encrypted, in the shape of the Syft Keras workflow.

* model owner: ``LocalCluster.start()`` (or ``RemoteCluster.join()``), ``connect``, ``share_model``,
  ``SecureModel.serve``
* client: ``PrivateClient.connect()``, ``PrivateClient.predict``
"""
from .client import InvalidImageError, PrivateClient, softmax
from .cluster import ClusterError, LocalCluster, RemoteCluster
from .data import load_mnist
from .model import load_logits_model, short_conv_mnist
from .serving import SecureModel, connect, share_model

__all__ = [
    "ClusterError", "InvalidImageError", "LocalCluster", "PrivateClient", "RemoteCluster", "SecureModel",
    "connect", "load_logits_model", "load_mnist", "share_model", "short_conv_mnist", "softmax",
]
