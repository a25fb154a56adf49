"""Joining the three servers from this process, and the secure protocol they run."""
import time
from collections import OrderedDict

import listen_guard

from ._tf import tf, tfe
from tf_encrypted.tensor.fixed import FixedpointConfig

from .config import SERVER_NAMES, ClusterConfig
from .ports import address_towards, free_ports
from .waiting import bounded

TFE_JOB, LOCAL_JOB = "tfe", "localhost"  # the job names in tf-encrypted's device names
LOCAL_DEVICE = f"/job:{LOCAL_JOB}/replica:0/task:0/device:CPU:0"

# Numbers are encoded as round(x * 65,535) in 64-bit integers: 65,535 = 2^16 - 1, so a pixel of 1 is
# the largest 16-bit number, and the clip that brings a client's pixels into [0, 1] (relu.clip) needs
# one comparison; at 3^10 = 59,049, where a pixel of 1 fell short of 2^16, it needed two. It is about 10 times
# finer than tf-encrypted's default 3^8, which left logit errors of 0.05. Values stay below VALUE_LIMIT
# in magnitude, enough for the bound that share_model proves for the committed model (value_range.py);
# at the products' double scale that is below 729 * 65,535^2 = 2^41.5, so each ReLU compares the same
# 42 bits as at 3^10 (and skips the same 15 below the scale). The servers' network truncates with its
# own uniformly masked truncation (truncation.py), which divides by any whole number. tf-encrypted
# reads the limit as scaling_base^precision_integral, which an encoding of base 65,535 cannot say:
# its integral precision is left at 0, and VALUE_LIMIT says the limit. tf-encrypted reads it in its own
# truncation, which the series never uses, in decoding, which leaves 64-bit words as they are, and in
# its check of the configuration (quiet at 0); its yardsticks in the benchmark keep their own defaults.
VALUE_LIMIT = 729
FIXED_POINT = FixedpointConfig(
    scaling_base=2**16 - 1, nbits=64, precision_integral=0, precision_fractional=1,
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
    links_ready(protocol)
    return protocol


LINKS_SECONDS = 30.0  # how long the servers' links may take to come back after an outage


def links_ready(protocol) -> None:
    """Send one number along each pair of servers, until every pair passes it (for up to LINKS_SECONDS).

    A connection between two servers that was carrying a computation when one of their hosts dropped
    off the network outlives the outage, broken: once the host is back, the next message over it fails at
    once ("Connection reset by peer"), and the one after reconnects. The serve command restarted after
    such an outage failed that way while sharing the model (tests/test_silent_hosts.py). So the links
    are tried here, before anything that matters uses them; a call that waits on a silent server is
    bounded.
    """
    deadline = time.monotonic() + LINKS_SECONDS
    while True:
        try:
            bounded(_across_links, protocol, timeout=max(0.5, deadline - time.monotonic()),
                    message=f"The servers did not pass a number to each other within {LINKS_SECONDS:.0f} s.")
            return
        except tf.errors.UnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@tf.function
def _across_links(protocol):
    passed = []
    servers = [protocol.server_0.device_name, protocol.server_1.device_name, protocol.server_2.device_name]
    for sender in servers:
        with tf.device(sender):
            number = tf.timestamp()  # made there at run time: no constant to fold away
        for receiver in servers:
            if receiver != sender:
                with tf.device(receiver):
                    passed.append(number + 1.0)
    return tf.add_n(passed)
