"""Starts that race, interrupts, malformed requests and stopped servers: each ends clearly, in bounded time."""
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import Hand, stop
from private_predictions import (RequestRefusedError, ServingConflictError, ServingStoppedError, connect,
                                 load_logits_model, load_mnist, share_model)
from private_predictions import client as client_module
from private_predictions.client import Card, DoorError, PrivateClient
from private_predictions.cluster import wait_for_servers
from private_predictions.commands import server as server_command
from private_predictions.ports import find_free_base_port, listens_on
from private_predictions.queues import MAX_BATCH_SIZE, PIXELS, someone_serves
from private_predictions.waiting import BackgroundCall, wait_for, wait_until
from private_predictions.tooling import start_serving_process

# One process of a race: start at the agreed moment, say how it went, keep a won cluster until stdin closes.
RACER = """
import json, sys, time
from private_predictions import ClusterError, LocalCluster
base, config_path, at = sys.argv[1], sys.argv[2], float(sys.argv[3])
time.sleep(max(0.0, at - time.time()))
began = time.monotonic()
try:
    cluster = LocalCluster.start(base_port=None if base == "free" else int(base), config_path=config_path)
except ClusterError as error:
    print(json.dumps({"won": False, "error": str(error), "seconds": time.monotonic() - began}), flush=True)
    sys.exit(0)
card = cluster.admit("tests", config_path + ".card.json", per_minute=None)
print(json.dumps({"won": True, "pids": cluster.pids, "hosts": cluster.config.hosts, "card": str(card),
                  "seconds": time.monotonic() - began}), flush=True)
sys.stdin.read()
cluster.stop()
"""


@pytest.fixture(scope="module")
def test_images():
    (_, _), (x_test, _) = load_mnist()
    return x_test


@pytest.fixture(scope="module")
def plaintext():
    return load_logits_model()


def race(config_paths, base):
    """Start one process per config path at the same moment; return them with what each said."""
    at = time.time() + 3  # past every racer's imports
    racers = [subprocess.Popen([sys.executable, "-c", RACER, base, str(path), str(at)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for path in config_paths]
    return racers, [json.loads(racer.stdout.readline() or '{"won": null}') for racer in racers]


def servers_of(tmp_path):
    """Server processes whose cluster file lies in ``tmp_path``."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        told = server_command.parse_command(process.info["cmdline"] or [])
        if told is not None and told.cluster_file and str(tmp_path) in told.cluster_file:
            found.append(process)
    return found


def assert_serves(config_path, card, images, plaintext):
    serving = start_serving_process(config_path)
    try:
        client = PrivateClient.connect(card, timeout=30)
        logits = client.predict_logits(images, timeout=60)
        assert np.abs(logits - plaintext(images).numpy()).max() < 0.02
    finally:
        serving.stop()


def end(racers):
    for racer in racers:
        racer.stdin.close()
        racer.wait(30)


@pytest.mark.parametrize("racers, same_file", [(2, True), (2, False), (3, True), (3, False)],
                         ids=["2 same file", "2 files", "3 same file", "3 files"])
def test_starts_racing_for_the_same_ports_leave_one_winner_and_clear_errors(
        tmp_path, racers, same_file, test_images, plaintext):
    paths = [tmp_path / ("cluster.json" if same_file else f"cluster{i}.json") for i in range(racers)]
    processes, said = race(paths, str(find_free_base_port()))
    try:
        winners = [i for i, s in enumerate(said) if s["won"]]
        assert len(winners) == 1, said
        for loser in (s for s in said if not s["won"]):
            assert loser["won"] is False and loser["seconds"] < 15, loser
            assert "port" in loser["error"] and ("process" in loser["error"] or "started" in loser["error"])
        winner = said[winners[0]]
        # Each port is held by the very process the winner started for it.
        for name, host in winner["hosts"].items():
            assert listens_on(winner["pids"][name], int(host.rsplit(":", 1)[1])), name
        assert_serves(paths[winners[0]], winner["card"], test_images[:2], plaintext)
    finally:
        end(processes)
    assert psutil.wait_procs(servers_of(tmp_path), timeout=15)[1] == []


def test_two_checkouts_starting_at_once_get_ports_of_their_own(tmp_path, test_images, plaintext):
    paths = [tmp_path / "a" / "cluster.json", tmp_path / "b" / "cluster.json"]
    for path in paths:
        path.parent.mkdir()
    processes, said = race(paths, "free")
    try:
        assert [s["won"] for s in said] == [True, True], said
        ports = [set(s["hosts"].values()) for s in said]
        assert not ports[0] & ports[1]
        for path, winner in zip(paths, said):
            assert_serves(path, winner["card"], test_images[:1], plaintext)
    finally:
        end(processes)
    assert psutil.wait_procs(servers_of(tmp_path), timeout=15)[1] == []


def test_a_second_serving_side_is_refused_and_the_first_keeps_answering(cluster, serving, test_images, plaintext):
    second = share_model(load_logits_model(), connect(cluster.config))
    start = time.monotonic()
    with pytest.raises(ServingConflictError, match="already serves this cluster"):
        second.serve(1, timeout=30, report=None)
    assert time.monotonic() - start < 5
    second.close()
    client = PrivateClient(Card.load(cluster.card))
    assert client.predict_logits(test_images[3:4]).argmax() == plaintext(test_images[3:4]).numpy().argmax()


# A process that waits in one call until interrupted, then shows it can go on.
INTERRUPTED = """
import sys, time
from private_predictions import LocalCluster, connect, load_logits_model, load_mnist, share_model
from pathlib import Path
from private_predictions.client import PrivateClient
what, config_path = sys.argv[1], sys.argv[2]
card = Path(config_path).parent / "card.json"
(_, _), (x_test, _) = load_mnist()
if what == "predict":  # notebook 03's client, through the doors
    client = PrivateClient.connect(card, timeout=30, say=lambda line: None)  # this stdout is for the test
    call = lambda: client.predict_logits(x_test[:1], timeout=60)
elif what == "serve":
    from private_predictions.config import ClusterConfig
    model = share_model(load_logits_model(), connect(ClusterConfig.load(config_path)))
    call = lambda: model.serve(1, timeout=60, report=None)
elif what == "connect":  # waits for servers that never come
    from private_predictions.cluster import wait_for_servers
    call = lambda: wait_for_servers(config_path, timeout=60, say=lambda line: None)
elif what == "card":  # waits for a card that never comes
    call = lambda: PrivateClient.connect(card, timeout=60, say=lambda line: None)
else:
    call = lambda: LocalCluster.start(config_path=config_path)
print("waiting", flush=True)
try:
    result = call()
    if getattr(result, "interrupted", False):  # serve() ends when interrupted, and returns how it ended
        print("interrupted", time.time(), flush=True)
    else:
        print("returned", flush=True)
except KeyboardInterrupt:
    print("interrupted", time.time(), flush=True)
sys.stdin.readline()  # the test has made the other side ready
if what == "predict":
    print("answer", int(client.predict_logits(x_test[1:2], timeout=60).argmax()), flush=True)
elif what == "serve":
    model.serve(1, timeout=60, report=None)
    print("served", flush=True)
"""


def default_interrupt():
    # A shell runs a background job with SIGINT ignored, and children inherit that: Python then never
    # raises KeyboardInterrupt. Jupyter's kernels get the default, which is what these tests are about.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt(what, config_path, tmp_path):
    process = subprocess.Popen([sys.executable, "-c", INTERRUPTED, what, str(config_path)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                               preexec_fn=default_interrupt)
    assert process.stdout.readline() == "waiting\n", process.stderr.read()
    time.sleep(2)  # well inside the call
    sent = time.time()
    process.send_signal(signal.SIGINT)
    line = process.stdout.readline().split()
    assert line[:1] == ["interrupted"], (line, process.stderr.read() if process.poll() is not None else "")
    assert float(line[1]) - sent < 1.0
    return process


def test_interrupting_a_waiting_query_returns_at_once_and_the_next_query_gets_its_own_answer(
        own_deployment, tmp_path, test_images, plaintext):
    own_deployment.serving.stop()
    own_deployment.serving = None
    # Once the killed side's lease has aged out, the query waits for a serving side and no fault ends that wait.
    hand = Hand(own_deployment.cluster.config_path)
    wait_until(lambda: not someone_serves(*hand.lease.read()), 30,
               "the killed serving side's lease never aged out")
    process = interrupt("predict", own_deployment.cluster.config_path, tmp_path)
    try:
        own_deployment.serving = start_serving_process(own_deployment.cluster.config_path)
        process.stdin.write("go\n")
        process.stdin.flush()
        answer = process.stdout.readline().split()
        assert answer == ["answer", str(plaintext(test_images[1:2]).numpy().argmax())], process.stderr.read()
    finally:
        stop(process)


def test_interrupting_a_waiting_serve_returns_at_once_and_serving_again_answers(
        own_deployment, tmp_path, test_images, plaintext):
    own_deployment.serving.stop()
    own_deployment.serving = None
    process = interrupt("serve", own_deployment.cluster.config_path, tmp_path)
    try:
        process.stdin.write("go\n")
        process.stdin.flush()
        logits = own_deployment.client.predict_logits(test_images[4:5], timeout=60)
        assert logits.argmax() == plaintext(test_images[4:5]).numpy().argmax()
        assert process.stdout.readline() == "served\n"
    finally:
        stop(process)


@pytest.mark.parametrize("what", ["connect", "card", "start"])
def test_interrupting_a_connect_or_a_start_returns_at_once_and_leaves_no_server(tmp_path, what):
    # connect waits for servers that never come; start is interrupted while its servers boot.
    process = interrupt(what, tmp_path / "cluster.json", tmp_path)
    try:
        assert psutil.wait_procs(servers_of(tmp_path), timeout=10)[1] == []
    finally:
        stop(process)


IMAGE = (28, 28, 1)
MALFORMED = {  # images staged on server0, on server1, the batch size announced
    "shares of different sizes": (1, 2, 1),
    "more images than announced": (3, 3, 1),
    "fewer images than announced": (1, 1, 2),
    "one share only": (1, None, 1),
    "batch larger than served": (MAX_BATCH_SIZE + 1, MAX_BATCH_SIZE + 1, MAX_BATCH_SIZE + 1),
}


@pytest.mark.parametrize("staged0, staged1, announced", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_request_is_refused_removed_and_serving_goes_on(cluster, client, serving, staged0, staged1,
                                                                   announced, test_images, plaintext):
    # What only a program inside the servers' runtime could make (the doors check every query first).
    client.predict_logits(test_images[:1])  # the served graph exists, and the serving side is known
    hand = Hand(cluster.config_path)
    key = 7_000_000 + staged0 * 100 + (staged1 or 0) * 10 + announced
    hand.stage(key, np.zeros((staged0, PIXELS)), None if staged1 is None else np.zeros((staged1, PIXELS)))
    hand.request(key, announced)
    wait_until(lambda: hand.staged(key) == [-1, -1], 15, "the malformed request's shares stayed on the servers")
    image = test_images[5:6]
    assert client.predict_logits(image, timeout=30).argmax() == plaintext(image).numpy().argmax()


def test_shares_of_the_wrong_width_cannot_even_be_staged(cluster, client):
    from private_predictions._tf import tf

    with pytest.raises(tf.errors.InvalidArgumentError):
        Hand(cluster.config_path).stage(7_100_000, np.zeros((1, 32 * 32)), np.zeros((1, 32 * 32)))


def test_the_client_says_when_its_request_was_refused(client, test_images, monkeypatch):
    client.predict_logits(test_images[:1])
    # A client that skips its own checks sends more images than the servers serve.
    monkeypatch.setattr(client_module, "validate_images", lambda images, *limits: images)
    with pytest.raises(RequestRefusedError, match="refused"):
        client.predict_logits(np.zeros((MAX_BATCH_SIZE + 1, *IMAGE)), timeout=30)
    monkeypatch.undo()
    assert client.predict_logits(test_images[:1], timeout=30).shape == (1, 10)


# Another process that reaches server0: requests with no shares behind them, as fast as the queue takes them.
FLOODER = """
import sys, threading
from tensorflow.python.ops import gen_data_flow_ops
sys.path.insert(0, sys.argv[2])
from conftest import Hand
from private_predictions._tf import tf
hand = Hand(sys.argv[1])
requests = hand.requests()
enqueue = tf.function(lambda queue, key: (
    gen_data_flow_ops.queue_enqueue_v2(queue, [key, tf.constant(1, tf.int64)]),
    gen_data_flow_ops.queue_size_v2(queue))[-1])
def flood(first, count):  # each thread waits while the queue is full, then fills it again
    for key in range(first, first + count):
        enqueue(requests.handle, tf.constant(key, tf.int64))
enqueue(requests.handle, tf.constant(1, tf.int64))
print("flooding", flush=True)
threads = [threading.Thread(target=flood, args=(10_000 * (1 + number), 333)) for number in range(9)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print("sent 3000", flush=True)
"""


def test_a_request_queue_kept_full_of_requests_without_shares_delays_a_complete_one_by_under_a_second(
        cluster, client, test_images, plaintext):
    image = test_images[6:7]
    client.predict_logits(image)  # the served graph exists, and the serving side is known
    requests = Hand(cluster.config_path).requests()
    flooder = subprocess.Popen([sys.executable, "-c", FLOODER, str(cluster.config_path), str(Path(__file__).parent)],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert flooder.stdout.readline() == "flooding\n"
        wait_until(lambda: requests.size() > MAX_BATCH_SIZE // 2, 30, "the flood did not fill the queue")
        delays = []
        for _ in range(3):  # the serving side empties the queue as fast as the flooder fills it
            start = time.monotonic()
            assert client.predict_logits(image, timeout=30).argmax() == plaintext(image).numpy().argmax()
            delays.append(time.monotonic() - start)
            assert flooder.poll() is None, "measured after the flood"
    finally:
        stop(flooder)
    assert max(delays) < 1.0, delays


@pytest.mark.parametrize("when", ["while the client waits", "before it sends"])
def test_servers_that_stop_give_the_helpers_error_never_a_raw_one(own_deployment, test_images, when):
    client = own_deployment.client
    client.predict_logits(test_images[:1])
    own_deployment.serving.stop()
    own_deployment.serving = None
    if when == "before it sends":
        own_deployment.cluster.stop()
    else:
        threading.Timer(1.0, own_deployment.cluster.stop).start()
    for attempt in range(2):  # the first failure, then a query on the servers that are gone
        with pytest.raises((DoorError, ServingStoppedError)):
            client.predict_logits(test_images[:1], timeout=30)


def test_a_client_started_before_the_servers_says_what_it_waits_for_at_once(tmp_path):
    said = []
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="notebook 02"):
        wait_for_servers(tmp_path / "cluster.json", timeout=2, say=said.append)
    assert len(said) == 1 and "Waiting up to 2 s" in said[0] and "cluster.json" in said[0]
    assert time.monotonic() - start < 5


def test_a_waits_result_comes_once_the_calls_thread_has_cleaned_up():
    # TensorFlow keeps graphs in thread-local storage, deleted as the thread ends. The serve command
    # exited while the thread of its last call was still deleting one, and aborted ("terminate called
    # without an active exception", exit -6) about one time in four.
    kept = threading.local()
    deleted = []

    class Graph:
        def __del__(self):
            time.sleep(0.2)  # a deletion that takes a moment, after the call has returned
            deleted.append(True)

    def trace():
        kept.graph = Graph()
        return "traced"

    assert wait_for(BackgroundCall(trace), 10) == "traced"
    assert deleted == [True]
