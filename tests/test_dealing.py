"""The dealer's material is made before the query (dealing.py), and each lot of it serves one query only."""
import gc
import threading

import numpy as np
import pytest
from tf_encrypted.protocol.pond.pond import PondPrivateTensor

from private_predictions import LocalCluster, connect, load_logits_model, load_mnist, share_model
from private_predictions._tf import tf
from private_predictions.client import Card, PrivateClient
from private_predictions.dealing import Stock, material, recording, using
from private_predictions.traffic import crossings, graphs, party


def test_a_stock_has_a_lot_ready_before_each_query_and_deals_the_next_while_the_servers_wait():
    dealt, release = [], threading.Event()

    def deal(bucket):
        if dealt:  # the lots after the first wait until the test lets them through
            assert release.wait(10)
        dealt.append(bucket)

    stock = Stock(deal, lots_per_bucket=2)
    stock.top_up(8)  # none was ready: dealt now
    assert dealt == [8] and stock.ready(8) == 1 and stock.ready(1) == 0
    stock.deal_ahead(8)  # returns at once, the lot is dealt in the background
    assert dealt == [8] and stock.ready(8) == 1
    stock.deal_ahead(8)  # one at a time
    release.set()
    stock.used(8)  # a query took the lot that was ready
    stock.top_up(8)  # waits for the lot dealt ahead, and counts it: nothing more to deal
    assert dealt == [8, 8] and stock.ready(8) == 1
    stock.deal_ahead(8)
    stock.top_up(8)
    stock.deal_ahead(8)  # two wait: no more
    stock.settle(10)
    assert dealt == [8, 8, 8] and stock.ready(8) == 2
    stock.forget(8)  # a computation failed, and may or may not have taken a lot: one is dealt before the next
    stock.top_up(8)
    assert dealt == [8, 8, 8, 8] and stock.ready(8) == 1


def test_a_lot_that_fails_to_be_dealt_ahead_is_not_counted_and_its_failure_is_raised():
    def deal(bucket):
        raise RuntimeError("server1 is gone")

    stock = Stock(deal)
    stock.deal_ahead(1)
    with pytest.raises(RuntimeError, match="server1 is gone"):
        stock.top_up(1)
    assert stock.ready(1) == 0


def test_a_query_takes_the_material_in_the_order_it_was_recorded_and_all_of_it():
    with recording() as made:
        first = material(lambda: {"a": 1, "b": (2, 3)})
        second = material(lambda: [4])
    assert (first, second) == ({"a": 1, "b": (2, 3)}, [4]) and made.tensors == [1, 2, 3, 4]
    with using(made.structures, [10, 20, 30, 40]):
        assert material(lambda: pytest.fail("dealt in the query")) == {"a": 10, "b": (20, 30)}
        assert material(lambda: pytest.fail("dealt in the query")) == [40]
    with pytest.raises(RuntimeError, match="took 1 of the 2"):
        with using(made.structures, [10, 20, 30, 40]):
            material(lambda: None)
    assert material(lambda: "dealt here") == "dealt here"  # outside both, a step deals as it goes


def _randomness(graph):
    return sorted({op.type for inner in graphs(graph) for op in inner.get_operations()
                   if "Random" in op.type or "Seed" in op.type})


def test_a_query_draws_no_randomness_and_server2_sends_only_its_answer(cluster):
    # The answer function of a bucket is the query's whole computation on the servers; its dealing was done
    # before, by the bucket's deal function. A step that dealt in the query would draw seeds or random words,
    # and server2 would send server1 the shares it deals.
    secure_model = share_model(load_logits_model(), connect(cluster.config))
    try:
        query = secure_model._answer_function(1).get_concrete_function().graph
        dealing = secure_model.lots(1).deal.get_concrete_function().graph
        assert _randomness(query) == []
        assert "SecureSeed" in _randomness(dealing) and "SecureSeededRandomUniform" in _randomness(dealing)
        from_server2 = {(party(op.device), tensor.dtype.name, tensor.op.type) for inner in graphs(query)
                        for op in inner.get_operations() for tensor in op.inputs
                        if party(tensor.op.device) == "server2" and party(op.device) not in (None, "server2")}
        # The ReLUs' answers: server1's shares of z and of z times the mask's parts, after the comparison.
        assert from_server2 == {("server1", "int64", "Pack")}
        assert crossings(dealing).get(("server2", "server1"), 0) > 0
    finally:
        secure_model.close()


def test_two_queries_of_the_same_images_open_different_values_and_a_third_without_material_fails_at_once(
        cluster, monkeypatch):
    # Each query takes a lot of its own from the servers' queues: were a lot used twice, the same images would
    # be opened with the same masks, and server0 and server1 would learn that the two queries were the same
    # (and, for different images, the difference of every value they open).
    from tf_encrypted.protocol.pond import pond

    opened = []
    reconstruct = pond.Pond._reconstruct
    monkeypatch.setattr(pond.Pond, "_reconstruct",
                        lambda self, *shares: opened.append(reconstruct(self, *shares)) or opened[-1])
    protocol = connect(cluster.config)
    secure_model = share_model(load_logits_model(), protocol)
    (_, _), (x_test, _) = load_mnist()
    encoded = np.round(x_test[:1] * protocol.fixedpoint_config.scaling_factor).astype(np.int64)
    lots = secure_model.lots(1)

    @tf.function
    def query():
        shares = []
        for share, server in ((np.zeros_like(encoded), protocol.server_0), (encoded, protocol.server_1)):
            with tf.device(server.device_name):
                shares.append(protocol.tensor_factory.tensor(tf.constant(share)))
        opened.clear()  # what the dealing's own trace recorded
        with lots.taking():
            logits = secure_model.network(PondPrivateTensor(protocol, *shares, True))
        masked = [tf.reshape(value, [-1]) for value in opened if value.dtype == tf.int64]
        return logits.reveal().to_native(), masked  # (the answer opened here for the test: not masked)

    try:
        lots.deal()
        lots.deal()
        (first, seen_first), (second, seen_second) = query(), query()
        np.testing.assert_allclose(first, second, atol=0.01)  # the same answer
        assert len(seen_first) > 10
        for one, other in zip(seen_first, seen_second):
            assert not np.any(one.numpy() == other.numpy())  # every 64-bit word opened differs
        assert lots.ready() == 0
        with pytest.raises(tf.errors.InvalidArgumentError, match="no material was dealt"):
            query()
    finally:
        secure_model.close()


def test_serving_deals_each_querys_material_before_it_and_keeps_count_of_what_waits(tmp_path):
    # Queries of several sizes, answered on arrival and from the backlog: each finds its lot dealt (a query
    # without one would fail), and what the serving side counts is what the servers' queues hold.
    (_, _), (x_test, _) = load_mnist()
    plaintext = load_logits_model()
    with LocalCluster.start(config_path=tmp_path / "c.json") as cluster:
        secure_model = share_model(plaintext, connect(cluster.config))
        reports = []
        try:
            client = PrivateClient(Card.load(cluster.admit("tests", tmp_path / "card.json")), say=lambda line: None)
            serving = threading.Thread(target=secure_model.serve, args=(5,), kwargs={"report": reports.append})
            serving.start()
            for images in (x_test[:1], x_test[1:2], x_test[2:5], x_test[5:8], x_test[8:9]):
                logits = client.predict_logits(images, timeout=120)
                assert (logits.argmax(1) == plaintext(images).numpy().argmax(1)).all()
            serving.join(120)
            assert not serving.is_alive() and not any("refused" in line for line in reports), reports
            for bucket in (1, 8):
                assert secure_model.stock.ready(bucket) == secure_model.lots(bucket).ready() >= 0, bucket
        finally:
            secure_model.close()
            del secure_model  # its handles to the servers' tables go while the servers are there
            gc.collect()


def test_after_a_computation_that_took_its_lot_from_one_server_only_the_buckets_lots_are_replaced(cluster):
    # A computation cut short (a failure, a pulled cable) may have dequeued its lot on server0 and not on
    # server1: every later query would then compute with server0's part of one lot and server1's part of
    # another, and answer wrong without an error. The serving side replaces the bucket's queues after a
    # failed computation (serving._Session), and the new ones line up.
    protocol = connect(cluster.config)
    secure_model = share_model(load_logits_model(), protocol)
    (_, _), (x_test, _) = load_mnist()
    expected = load_logits_model()(x_test[:1]).numpy()
    encoded = np.round(x_test[:1] * protocol.fixedpoint_config.scaling_factor).astype(np.int64)

    def answer():
        lots = secure_model.lots(1)

        @tf.function
        def query():
            shares = []
            for share, server in ((np.zeros_like(encoded), protocol.server_0), (encoded, protocol.server_1)):
                with tf.device(server.device_name):
                    shares.append(protocol.tensor_factory.tensor(tf.constant(share)))
            with lots.taking():
                return secure_model.network(PondPrivateTensor(protocol, *shares, True)).reveal().to_native()
        lots.deal()
        return query().numpy()

    try:
        secure_model.lots(1).deal()
        secure_model.lots(1)._queues["server0"].dequeue()  # what a computation cut short may leave
        assert np.abs(answer() - expected).max() > 1  # server0's part of the second lot, server1's of the first
        secure_model.discard_lots(1)
        np.testing.assert_allclose(answer(), expected, atol=0.01)
    finally:
        secure_model.close()
