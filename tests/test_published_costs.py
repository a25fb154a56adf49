"""What the model owner publishes for clients about each batch size: what the plaintext model takes on
its machine, and how many bytes the servers send each other, counted on the computation's graph."""
import time

import numpy as np
import pytest

from private_predictions._tf import tf
from private_predictions.client import Card, PrivateClient
from private_predictions.data import load_mnist
from private_predictions.traffic import crossings

SERVERS = [f"/job:tfe/replica:0/task:{i}/device:CPU:0" for i in range(3)]


def loopback_bytes() -> int:
    return int(open("/sys/class/net/lo/statistics/tx_bytes").read())


def test_the_bytes_between_servers_are_counted_exactly_once_per_receiving_server():
    @tf.function
    def computation(flag):
        with tf.device(SERVERS[0]):
            a = tf.zeros((3, 4), tf.int64)  # 96 bytes
        with tf.device(SERVERS[1]):
            b = a + 1  # a crosses to server1 ...
            total = tf.reduce_sum(a)  # ... once, however many of its ops use it
            small = tf.cast(b, tf.uint8)
        with tf.device(SERVERS[2]):
            small = tf.identity(small)  # 12 bytes from server1 to server2
            # Inside a condition's branch too: a crosses to server2.
            chosen = tf.cond(flag, lambda: tf.reduce_sum(a), lambda: tf.constant(0, tf.int64))
        return small, total, chosen

    graph = computation.get_concrete_function(tf.TensorSpec([], tf.bool)).graph
    assert crossings(graph) == {("server0", "server1"): 96, ("server1", "server2"): 12, ("server0", "server2"): 96}


def test_a_crossing_of_unknown_size_is_refused_rather_than_guessed():
    @tf.function
    def computation(values):
        with tf.device(SERVERS[0]):
            doubled = values * 2
        with tf.device(SERVERS[1]):
            return doubled + 1

    with pytest.raises(ValueError, match="no static shape"):
        crossings(computation.get_concrete_function(tf.TensorSpec([None], tf.int64)).graph)


def test_a_client_reads_what_was_published_about_its_batch_size_once_it_has_been_answered(own_deployment):
    (_, _), (x_test, _) = load_mnist()
    client = PrivateClient(Card.load(own_deployment.card))
    with pytest.raises(LookupError, match="Ask a query of that size first"):
        client.published_costs(1)
    client.predict_logits(x_test[:1])
    one = client.published_costs(1)  # at once: published before the first answer of that size
    assert one.batch == 1 and 0 < one.plaintext_seconds < 1 and one.servers_bytes > 100_000

    # Batches are computed padded: 3 images cost what 8 do, and are published once 8 has been built.
    with pytest.raises(LookupError):
        client.published_costs(3)
    client.predict_logits(x_test[:3])
    eight = client.published_costs(3)
    assert eight.batch == 8 and eight.servers_bytes > one.servers_bytes

    # The count is what goes over the wire between the servers (here all on loopback), less gRPC's framing:
    # the client's shares and the door's TLS add a few kB more. It counts the query's share of the dealing,
    # which the serving side does while it waits for the next query of the size it answered last
    # (dealing.py): after two single images, only material for single images is dealt, 16 lots at a time.
    # A pack of lots being dealt as the count starts or ends may fall in it or out of it: over 80 queries
    # (five packs), that moves a query's count by a few per cent at most.
    for _ in range(2):
        client.predict_logits(x_test[:1])
    before = loopback_bytes()
    for _ in range(80):
        client.predict_logits(x_test[:1])
    sent = (loopback_bytes() - before) / 80
    print(f"published {one.servers_bytes} bytes between the servers; loopback carried {sent:.0f} a query")
    assert 0.95 * one.servers_bytes < sent < 1.3 * one.servers_bytes + 50_000
