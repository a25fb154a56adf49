"""Many clients at once get their own answers; faults end in clear errors, in bounded time."""
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from private_predictions.waiting import wait_until

from private_predictions import LocalCluster, connect, load_logits_model, load_mnist, share_model
from private_predictions.client import Card, PrivateClient, ServerSilentError, ServingStoppedError
from private_predictions.ports import find_free_base_port
from private_predictions.tooling import start_serving_process
from conftest import Hand

CLIENTS, QUERIES = 4, 25


def test_concurrent_clients_each_get_exactly_their_own_predictions(cluster, serving, tmp_path):
    cards = [cluster.admit(f"client-{number}", tmp_path / f"card-{number}.json", per_minute=None)
             for number in range(CLIENTS)]
    clients = [
        subprocess.Popen(
            [sys.executable, "-m", "private_predictions.commands.predict", str(cards[number]),
             "--first", str(1000 + 100 * number), "--count", str(QUERIES), "--timeout", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for number in range(CLIENTS)
    ]
    answers = []
    for client in clients:
        stdout, stderr = client.communicate(timeout=300)
        assert client.returncode == 0, stderr[-2000:]
        answers.append([json.loads(line) for line in stdout.splitlines()])

    (_, _), (x_test, _) = load_mnist()
    plaintext = load_logits_model()
    for number, answer in enumerate(answers):
        expected = list(range(1000 + 100 * number, 1000 + 100 * number + QUERIES))
        assert [a["index"] for a in answer] == expected  # none lost, none duplicated
        logits = np.array([a["logits"] for a in answer])
        plain = plaintext(x_test[expected]).numpy()
        # Another client's answer would differ by far more than fixed-point rounding.
        assert np.abs(logits - plain).max() < 0.02
        assert [a["prediction"] for a in answer] == list(plain.argmax(axis=1))


SIMULATE_MISSING_OP = """
import tensorflow as tf
from tensorflow.python.framework.errors import NotFoundError

def missing(path):
    raise NotFoundError(None, None, "simulated: op library missing")

tf.load_op_library = missing
import private_predictions.serving
"""


def test_refuses_to_run_without_secure_randomness():
    # The servers and the serving side import TensorFlow through private_predictions._tf first, so both
    # refuse. (The client draws its shares from the operating system, and needs no TensorFlow.)
    result = subprocess.run([sys.executable, "-c", SIMULATE_MISSING_OP],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "InsecureRandomnessError" in result.stderr
    assert "secure-randomness op did not load" in result.stderr


def test_a_killed_server_stops_client_and_serving_side_clearly_and_a_restart_serves_again(
        own_deployment, test_images):
    client, cluster = own_deployment.client, own_deployment.cluster
    client.predict_logits(test_images[:1])
    cluster.processes["server2"].kill()
    start = time.monotonic()
    with pytest.raises(ServerSilentError, match="server2"):
        client.predict_logits(test_images[:1], timeout=60)
    assert time.monotonic() - start < 15
    # The serving side stops too, saying why, rather than wait for queries it cannot answer.
    assert own_deployment.serving.wait(15) != 0
    assert "serving stopped: server2" in "".join(own_deployment.serving.output)

    # Starting again on the same ports replaces server0 and server1, still running from
    # the first start; this same process then connects again and is answered.
    own_deployment.cluster = LocalCluster.start(base_port=cluster.config.address("server0")[1],
                                                config_path=cluster.config_path)
    assert not any(cluster.alive().values())
    own_deployment.serving = start_serving_process(cluster.config_path)
    card = own_deployment.cluster.admit("tests", cluster.config_path.parent / "card.json", per_minute=None)
    client = PrivateClient.connect(card, timeout=30)  # new servers, new doors' certificates: a new card
    again = client.predict_logits(test_images[1:2], timeout=60)
    assert again.argmax() == load_logits_model()(test_images[1:2]).numpy().argmax()


def test_a_killed_serving_side_gives_a_clear_error_and_a_restart_serves_again(own_deployment, test_images):
    client = own_deployment.client
    client.predict_logits(test_images[:1])
    own_deployment.serving.stop()
    start = time.monotonic()
    with pytest.raises(ServingStoppedError, match="serving side stopped|nobody serves"):
        client.predict_logits(test_images[:1], timeout=60)
    assert time.monotonic() - start < 15

    own_deployment.serving = start_serving_process(own_deployment.cluster.config_path)
    # The restarted side may still answer the failed query; that answer must not be
    # taken for this one, so ask about a different image.
    again = client.predict_logits(test_images[1:2], timeout=60)
    # The same logits, not only the same digit: the restarted side computes with its own functions and shares,
    # never with what the killed side compiled or left on the servers (compiled.py).
    np.testing.assert_allclose(again, load_logits_model()(test_images[1:2]).numpy(), atol=0.01)


def test_a_client_waiting_after_serving_has_ended_is_told_so(tmp_path, test_images):
    # As in the notebooks: the model owner's kernel stays up after serve() has returned.
    with LocalCluster.start(base_port=find_free_base_port(), config_path=tmp_path / "c.json") as cluster:
        secure_model = share_model(load_logits_model(), connect(cluster.config))
        client = PrivateClient(Card.load(cluster.admit("tests", tmp_path / "card.json", per_minute=None)))
        serving = threading.Thread(target=secure_model.serve, args=(1,), kwargs={"report": None})
        serving.start()
        client.predict_logits(test_images[:1], timeout=60)
        serving.join(60)
        start = time.monotonic()
        with pytest.raises(ServingStoppedError, match="nobody serves the model now"):
            client.predict_logits(test_images[1:2], timeout=60)
        assert time.monotonic() - start < 15
        secure_model.close()


@pytest.fixture(scope="module")
def test_images():
    (_, _), (x_test, _) = load_mnist()
    return x_test


def test_a_request_with_one_share_behind_it_holds_up_nobody_and_is_removed(cluster, client, test_images):
    client.predict_logits(test_images[:1])  # the served graph exists before the clock starts
    share0, _ = client.share(test_images[:1].astype(np.float64))
    # What only a program inside the servers' runtime could leave (the doors never do): a request with
    # one share behind it.
    hand = Hand(cluster.config_path)
    hand.stage(12345, share0=share0)
    hand.request(12345, 1)
    start = time.monotonic()
    logits = client.predict_logits(test_images[2:3], timeout=60)
    assert logits.argmax() == load_logits_model()(test_images[2:3]).numpy().argmax()
    assert time.monotonic() - start < 15
    wait_until(lambda: hand.staged(12345) == [-1, -1], 15, "the lone share stayed on server0")


def test_queries_that_wait_together_are_answered_together(cluster, serving, client, test_images):
    # A class: while the servers answer one student, others ask. The serving side last answered a single
    # image (so a request of one image is answered on arrival, on the servers); six more arrive at once.
    client.predict_logits(test_images[:1])
    hand, keys = Hand(cluster.config_path), [23001 + number for number in range(6)]
    for key, image in zip(keys, test_images[3:9]):
        share0, share1 = client.share(image[None].astype(np.float64))
        hand.stage(key, share0=share0, share1=share1)
    seen = len(serving.output)
    hand.requests_at_once(keys, [1] * len(keys))
    together = "answered a private batch of 1 image (with 5 other queries)"

    def answered():
        return [line for line in serving.output[seen:] if ": answered" in line]
    wait_until(lambda: len(answered()) == 6, 30, "the six queries were not all answered")
    assert all(line.rstrip().endswith(together) for line in answered()), answered()


def test_a_busy_machine_is_not_taken_for_a_silent_server_but_a_silent_one_is_named(monkeypatch):
    # On a teacher's busy laptop one probe can miss its half second while the port is fine: serving then
    # stopped, and with it the class. A host is silent only once it has not answered for SILENT_AFTER s;
    # a process that is gone (its port refuses) is named at once.
    from private_predictions import watch
    from private_predictions.config import ClusterConfig

    now, states = [100.0], {"server0": "open", "server1": "silent", "server2": "open"}
    config = ClusterConfig.local([1, 2, 3])
    by_port = {config.address(name)[1]: name for name in config.hosts}
    monkeypatch.setattr(watch.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(watch, "probe", lambda host, port: states[by_port[port]])
    servers = watch.ServerWatch(config, "")
    servers.check()  # one missed probe: not yet
    now[0] += watch.SILENT_AFTER - 0.5
    servers.check()
    states["server1"] = "open"  # it answers again: the count starts over
    servers.check()
    states["server1"] = "silent"
    now[0] += 1.0
    servers.check()
    now[0] += watch.SILENT_AFTER
    with pytest.raises(watch.ServerUnreachableError, match="server1") as silent:
        servers.check()
    assert silent.value.silent
    states["server2"] = "refused"
    states["server1"] = "open"
    with pytest.raises(watch.ServerUnreachableError, match="server2") as gone:
        servers.check()
    assert not gone.value.silent


def test_a_host_coming_back_between_two_looks_is_not_taken_for_a_dead_process(monkeypatch):
    # A blip: the host is silent, then answers again. Whatever one look finds, it must not be called a
    # dead process (serving stopped for good on a two-second blip when "not open" and "not silent" were
    # two connection attempts, the second made after the host came back).
    from private_predictions import watch
    from private_predictions.config import ClusterConfig

    config = ClusterConfig.local([1, 2, 3])
    by_port = {config.address(name)[1]: name for name in config.hosts}
    looks = {"server1": iter(["silent", "open", "open"])}
    monkeypatch.setattr(watch, "probe", lambda host, port: next(looks.get(by_port[port], iter(["open"]))))
    servers = watch.ServerWatch(config, "")
    assert servers.first_gone(silent_after=0.0) == "server1" and servers.silent("server1")
    assert servers.first_gone(silent_after=0.0) is None
