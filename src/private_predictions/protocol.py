"""Joining the three servers from this process, and the secure protocol they run."""
from collections import OrderedDict

import listen_guard

from ._tf import tf, tfe
from tf_encrypted.tensor.fixed import FixedpointConfig

from .config import SERVER_NAMES, ClusterConfig
from .ports import address_towards, free_ports

TFE_JOB, LOCAL_JOB = "tfe", "localhost"  # the job names in tf-encrypted's device names
LOCAL_DEVICE = f"/job:{LOCAL_JOB}/replica:0/task:0/device:CPU:0"

# Numbers are encoded as round(x * 3^10) in 64-bit integers: 9 times finer than tf-encrypted's
# default 3^8, which left logit errors of 0.05. The integer part holds |x| < 3^6 = 729, enough for
# the bound that share_model proves for the committed model (value_range.py); at the products'
# double scale that is below 2^42, the bits each ReLU compares. The servers' network truncates with
# its own uniformly masked truncation (truncation.py), which divides by any whole number, so the
# base no longer has to be odd. 3^10 stays: a finer scale would make each ReLU compare more bits
# (its time grows with them) for logits already within 0.004 of the model's, and a coarser one would
# cost precision for little speed. The truncation gap serves only tf-encrypted's own truncation,
# which the benchmark's yardsticks (tf-encrypted's Keras layers) still use.
FIXED_POINT = FixedpointConfig(
    scaling_base=3, nbits=64, precision_integral=6, precision_fractional=10,
    matmul_threshold=256, truncation_gap=19, use_noninteractive_truncation=False,
)


def tfe_config(config: ClusterConfig):
    return tfe.RemoteConfig(OrderedDict((name, config.hosts[name]) for name in SERVER_NAMES), job_name=TFE_JOB)


def connect(config: ClusterConfig):
    """Make the three servers available to this process and return SecureNN over them.

    This process joins the cluster as a task of its own, and the servers connect back
    to it while running a model (parts of a traced function stay here). TF's default
    (tf-encrypted's ``connect_servers``) gives this task the address ``localhost:PORT``,
    which on another machine means that machine itself: with servers on other hosts,
    every private prediction failed with "failed to connect to all addresses". So the
    address given is the one the servers reach us at, and this task's server listens
    there only (loopback when the servers are on this machine): see ``listen_guard``.
    """
    tfe.set_config(tfe_config(config))
    own_address = address_towards(*config.address(SERVER_NAMES[0]))
    own_port = free_ports(1)[0]
    listen_guard.listen_only(own_port, own_address, "this process's TensorFlow server")
    cluster = tf.train.ClusterSpec({
        TFE_JOB: [config.hosts[name] for name in SERVER_NAMES],
        LOCAL_JOB: [f"{own_address}:{own_port}"],
    })
    tf.config.experimental_connect_to_cluster(cluster, job_name=LOCAL_JOB)
    listen_guard.check_listening(own_port, own_address, "this process's TensorFlow server")
    protocol = tfe.protocol.SecureNN(fixedpoint_config=FIXED_POINT)
    tfe.set_protocol(protocol)
    return protocol
