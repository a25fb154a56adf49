"""The dealer's material is made before the query (dealing.py), and each lot of it serves one query only."""
import gc
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import shared

from private_predictions import LocalCluster, connect, load_logits_model, load_mnist, share_model
from private_predictions._tf import tf
from private_predictions.client import Card, PrivateClient
from private_predictions.dealing import (HANDLES, MISMATCH, NUMBER, SERVERS, Lots, Stock, material, pack_of, recording,
                                         using)
from private_predictions.traffic import crossings, graphs, party


class Servers:
    """What a stock's deal and renew do to the servers' queues, for the stock's own tests."""

    def __init__(self, hold=None, pack=lambda bucket: 1):
        self.queues, self.dealt, self.hold, self.pack = {}, [], hold, pack

    def deal(self, bucket, number):
        if self.hold is not None and self.dealt:  # the packs after the first wait until the test lets them through
            assert self.hold.wait(10)
        self.dealt.append((bucket, number))
        self.queues.setdefault(bucket, []).extend(range(number, number + self.pack(bucket)))

    def renew(self, bucket):
        self.queues[bucket] = []


def test_a_stock_has_a_lot_ready_before_each_query_and_deals_the_next_while_the_servers_wait():
    release = threading.Event()
    servers = Servers(hold=release)
    stock = Stock(servers.deal, servers.renew, lots_per_bucket=2)
    stock.top_up(8)  # none was ready: dealt now
    assert servers.dealt == [(8, 0)] and stock.ready(8) == 1 and stock.ready(1) == 0 and stock.next(8) == 0
    stock.deal_ahead(8)  # returns at once, the lot is dealt in the background
    assert servers.dealt == [(8, 0)] and stock.ready(8) == 1
    stock.deal_ahead(8)  # one at a time
    stock.top_up(8)  # a lot waits: returns without waiting for the one being dealt
    assert servers.dealt == [(8, 0)] and stock.ready(8) == 1
    release.set()
    servers.queues[8].pop(0)
    stock.used(8)  # a query took lot 0
    stock.top_up(8)  # none left: waits for the lot dealt ahead, which counts: nothing more to deal
    assert servers.dealt == [(8, 0), (8, 1)] and stock.ready(8) == 1 and stock.next(8) == 1
    stock.deal_ahead(8)
    stock.settle()
    stock.top_up(8)
    stock.deal_ahead(8)  # two wait: no more
    stock.settle()
    assert servers.queues[8] == [1, 2] and stock.ready(8) == 2 and stock.next(8) == 1


def test_lots_dealt_in_packs_are_counted_one_by_one_and_the_next_pack_comes_when_half_a_pack_is_left():
    servers = Servers(pack=lambda bucket: 4 if bucket == 1 else 1)
    stock = Stock(servers.deal, servers.renew, pack=servers.pack, lots_per_bucket=1)
    stock.top_up(1)  # one call deals lots 0 to 3
    assert servers.dealt == [(1, 0)] and stock.ready(1) == 4 and stock.next(1) == 0
    taken = []
    for _ in range(3):
        taken.append(servers.queues[1].pop(0))
        stock.used(1)
        stock.top_up(1)
        stock.deal_ahead(1)
        stock.settle()
    # Lots 4 to 7 were dealt once two were left (half a pack), and lot 3 is next: none skipped, none twice.
    assert taken == [0, 1, 2] and servers.dealt == [(1, 0), (1, 4)]
    assert servers.queues[1] == [3, 4, 5, 6, 7] and stock.next(1) == 3 and stock.ready(1) == 5
    stock.unsure(1)  # a failed query: new queues, and the numbers go on after the last pack's
    stock.top_up(1)
    assert servers.queues[1] == [8, 9, 10, 11] and stock.next(1) == 8 and stock.ready(1) == 4


def test_after_a_query_that_may_have_taken_its_lot_on_some_servers_only_the_queues_are_renewed_and_numbers_go_on():
    servers = Servers()
    stock = Stock(servers.deal, servers.renew)
    stock.top_up(1)
    stock.deal_ahead(1)
    stock.settle()
    stock.top_up(1)
    assert servers.queues[1] == [0, 1]
    stock.unsure(1)  # a computation failed, or was left running
    stock.deal_ahead(1)  # not into queues that may not line up
    stock.top_up(1)
    # New queues, then one new lot, with a number no lot had: one left in a queue could never pass for it.
    assert servers.queues[1] == [2] and stock.next(1) == 2 and stock.ready(1) == 1
    stock.all_unsure()  # a server's outage
    stock.top_up(1)
    assert servers.queues[1] == [3] and stock.next(1) == 3


def test_a_lot_that_fails_to_be_dealt_ahead_is_not_counted_and_its_bucket_gets_new_queues():
    servers = Servers()

    def deal(bucket, number):
        if number == 1:
            servers.queues[bucket].append(number)  # on some servers only, then server1 went silent
            raise RuntimeError("server1 is gone")
        servers.deal(bucket, number)

    stock = Stock(deal, servers.renew)
    stock.top_up(1)
    servers.queues[1].pop(0)
    stock.used(1)
    stock.deal_ahead(1)
    # Not raised: serving rode the outage out, and the servers answer again; the next lot is dealt into new
    # queues (were they still gone, dealing it would fail, and say so).
    stock.top_up(1)
    assert servers.queues[1] == [2] and stock.next(1) == 2 and stock.ready(1) == 1


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


def test_a_pack_is_cut_along_the_images_into_numbered_lots_and_what_cannot_be_cut_is_refused(cluster):
    # Lots are dealt a pack at a time (16 of one image): each lot must be its own query's rows of what one
    # computation dealt, with its own number.
    protocol = connect(cluster.config)
    devices = [protocol.server_0.device_name, protocol.server_1.device_name, protocol.server_2.device_name]

    def build(images, seed=False):
        for number, device in enumerate(devices):
            with tf.device(device):  # image i's rows hold 10 * i + the server's number
                material(lambda: tf.tile(tf.range(images, dtype=tf.int64)[:, None] * 10 + number, [1, 3]))
                if seed:
                    material(lambda: tf.zeros([2], tf.int64))
    lots = Lots(build, 1, party, pack=4)
    lots.deal(8)
    assert lots.sizes() == [4] * 3
    for lot in range(4):
        for number, queue in enumerate(lots._queues[server] for server in SERVERS):
            taken, rows = queue.dequeue()
            assert int(taken) == 8 + lot and rows.numpy().tolist() == [[10 * lot + number] * 3]
    lots.close()
    with pytest.raises(ValueError, match="cannot be cut into 4 lots"):
        Lots(lambda images: build(images, seed=True), 1, party, pack=4)


def test_every_tensor_the_network_deals_grows_with_the_images_so_each_lot_of_a_pack_is_one_querys(cluster):
    # A tensor dealt once for all the images of a pack (a seed, a mask of the weights) would be in every lot
    # cut from it: one mask for several queries. The cut (Lots) only checks that the pack divides its first
    # axis; this checks that what the network deals for a pack of images is that many times what it deals
    # for one, tensor by tensor, in the same places.
    secure_model = share_model(load_logits_model(), connect(cluster.config))

    def dealt(images):
        traced = []

        def trace():
            with recording() as made:
                secure_model.network(secure_model._zero_images(images))
            traced.append([(tensor.device, tensor.dtype, tensor.shape.as_list()) for tensor in made.tensors])
        tf.function(trace).get_concrete_function()
        return traced[0]
    try:
        lot, pack = dealt(1), dealt(pack_of(1))
        assert pack_of(1) > 1 and len(lot) == len(pack) > 20
        for (device, dtype, shape), (packed_device, packed_dtype, packed_shape) in zip(lot, pack):
            assert (packed_device, packed_dtype) == (device, dtype) and shape
            assert packed_shape == [pack_of(1) * shape[0]] + shape[1:]
    finally:
        secure_model.close()


def test_no_lot_of_a_pack_holds_what_another_holds(cluster):
    # A value drawn once and spread over a pack's images (broadcast, tiled) would grow with the images, pass
    # the test above, and be in every lot cut from it. Every tensor of every lot must differ from the same
    # tensor of every other lot of its pack, on every server.
    secure_model = share_model(load_logits_model(), connect(cluster.config))
    lots = secure_model.lots(1)
    try:
        lots.deal(0)
        for server in SERVERS:
            pack = [lots._queues[server].dequeue()[1:] for _ in range(lots.pack)]
            assert len(pack[0]) > 10
            for position in range(len(pack[0])):
                cuts = {lot[position].numpy().tobytes() for lot in pack}
                assert len(cuts) == lots.pack, (server, position, pack[0][position].shape)
    finally:
        secure_model.close()


def test_a_query_draws_no_randomness_and_server2_sends_only_its_answer(cluster):
    # The answer function of a bucket is the query's whole computation on the servers; its dealing was done
    # before, by the bucket's deal function. A step that dealt in the query would draw seeds or random words,
    # and server2 would send server1 the shares it deals.
    secure_model = share_model(load_logits_model(), connect(cluster.config))
    try:
        query = secure_model._answer_function(1).get_concrete_function().graph
        dealing = secure_model.lots(1).dealing.get_concrete_function().graph
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

    @tf.function(input_signature=[NUMBER])
    def query(number):
        image = shared(protocol, encoded, scaled=True)
        opened.clear()  # what the dealing's own trace recorded
        with lots.taking(number, lots.handles()):
            logits = secure_model.network(image)
        masked = [tf.reshape(value, [-1]) for value in opened if value.dtype == tf.int64]
        return logits.reveal().to_native(), masked  # (the answer opened here for the test: not masked)

    try:
        lots.deal(0)  # one pack: lots 0 to pack - 1, dealt by one computation and cut along the images
        assert lots.pack > 1 and lots.sizes() == [lots.pack] * 3
        (first, seen_first), (second, seen_second) = query(0), query(1)
        expected = load_logits_model()(x_test[:1]).numpy()
        np.testing.assert_allclose(first, expected, atol=0.01)  # the right answer, both times
        np.testing.assert_allclose(second, expected, atol=0.01)
        assert len(seen_first) > 10
        for one, other in zip(seen_first, seen_second):
            assert not np.any(one.numpy() == other.numpy())  # every 64-bit word opened differs
        assert lots.sizes() == [lots.pack - 2] * 3
        lots.renew()  # new queues, empty
        with pytest.raises(tf.errors.InvalidArgumentError, match="no material was dealt"):
            query(2)
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
            secure_model.stock.settle()  # a pack may still be on its way in
            for bucket in (1, 8):
                assert secure_model.lots(bucket).sizes() == [secure_model.stock.ready(bucket)] * 3, bucket
            assert secure_model.stock.ready(8) == 1  # of a larger size, the next query's lot waits, no more
        finally:
            secure_model.close()
            del secure_model  # its handles to the servers' tables go while the servers are there
            gc.collect()


def test_a_query_whose_lot_was_taken_on_one_server_only_fails_before_opening_and_the_next_is_right(cluster):
    # A computation cut short (a failure, a pulled cable, an interrupt) may have dequeued its lot on server0
    # and not on server1: without the lots' numbers, every later query would compute with server0's part of
    # one lot and server1's part of another, and answer wrong without an error. With them, such a query fails
    # before anything is opened; the serving side then gives the bucket new queues (Stock.unsure), and the next
    # is right. A computation still running on the old ones fails at once, and takes nothing from the new.
    from tf_encrypted.protocol.pond import pond

    protocol = connect(cluster.config)
    secure_model = share_model(load_logits_model(), protocol)
    (_, _), (x_test, _) = load_mnist()
    expected = load_logits_model()(x_test[:1]).numpy()
    encoded = np.round(x_test[:1] * protocol.fixedpoint_config.scaling_factor).astype(np.int64)
    opened = []
    reconstruct = pond.Pond._reconstruct

    def reconstruct_and_count(self, *shares):
        with tf.control_dependencies([tf.py_function(lambda: opened.append(1), [], [])]):
            return tf.identity(reconstruct(self, *shares))

    stock = secure_model.stock
    lots = secure_model.lots(1)

    @tf.function(input_signature=[NUMBER, HANDLES])
    def query(number, queues):
        image = shared(protocol, encoded, scaled=True)
        with lots.taking(number, queues):
            return secure_model.network(image).reveal().to_native()

    try:
        stock.top_up(1)
        stock.deal_ahead(1)
        stock.top_up(1)
        lots._queues["server0"].dequeue()  # what a computation cut short may leave
        pond.Pond._reconstruct = reconstruct_and_count
        try:
            query.get_concrete_function()
        finally:
            pond.Pond._reconstruct = reconstruct
        with pytest.raises(tf.errors.InvalidArgumentError, match=MISMATCH):
            query(stock.next(1), lots.handles())
        assert opened == []  # nothing was opened with parts of two lots
        old = lots.handles()
        stock.unsure(1)
        stock.top_up(1)
        assert lots.sizes() == [lots.pack] * 3
        with pytest.raises(tf.errors.OpError):
            query(stock.next(1), old)
        assert lots.sizes() == [lots.pack] * 3 and opened == []
        np.testing.assert_allclose(query(stock.next(1), lots.handles()).numpy(), expected, atol=0.01)
        assert len(opened) > 10
    finally:
        secure_model.close()


# A serving process that deals the first lot of a bucket and is killed, then another one that does the same.
KILLED_AFTER_DEALING = """
import os, signal, sys
from private_predictions import connect, load_logits_model, share_model
from private_predictions.config import ClusterConfig

lots = share_model(load_logits_model(), connect(ClusterConfig.load(sys.argv[1]))).lots(1)
print(lots.sizes(), flush=True)
lots.deal(0)
os.kill(os.getpid(), signal.SIGKILL)  # as the serve command is killed: nothing deletes the queues
"""


def test_a_serving_process_never_finds_the_queues_of_one_killed_before_it(cluster, tmp_path):
    # TensorFlow's FIFOQueue names its queue after a counter of the process in eager mode, whatever name it is
    # given; two processes running the same code count alike. The second would then take the first's lots:
    # material dealt for another sharing of the model, the weights' masks of another sharing, wrong answers.
    script = tmp_path / "killed.py"
    script.write_text(KILLED_AFTER_DEALING)
    for _ in range(2):
        run = subprocess.run([sys.executable, str(script), str(cluster.config_path)], capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
        assert run.stdout == "[0, 0, 0]\n"  # new queues, empty
