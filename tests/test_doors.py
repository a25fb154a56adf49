"""The doors: clients reach the served model through server0's and server1's TLS doors only.

What a door lets through is one share of one admitted client's batch, and that client's
share of the answer; everything else (no token, a revoked one, another certificate,
malformed or oversized requests, one share alone, a slow sender, another client's id) is
refused at the door, without holding up anybody else.
"""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import grpc
import numpy as np
import psutil
import pytest

from private_predictions.certificates import make_certificate
from private_predictions.client import (ASK, CHANNEL_OPTIONS, DOORS, HELLO, Card, DoorError, NotAdmittedError,
                                        PrivateClient, ServingStoppedError, door_name, new_client_id, new_nonce)
from private_predictions.data import load_mnist
from private_predictions.paths import CHECK_LOGITS_PATH
from private_predictions.ports import find_free_base_port
from private_predictions.admission import digest
from private_predictions.door import PARTNER_SECONDS
from private_predictions.queues import MAX_BATCH_SIZE, query_key
from private_predictions.tooling import start_serving_process
from private_predictions.waiting import wait_until
from private_predictions import LocalCluster
from conftest import Hand, stop

CHECK = np.load(CHECK_LOGITS_PATH)  # the plaintext model's logits of the first 100 test images
TOLERANCE = 0.02  # fixed-point rounding; another image's logits differ by far more


@pytest.fixture(scope="module")
def x_test():
    (_, _), (images, _) = load_mnist()
    return images


def card_for(cluster, tmp_path, name, per_minute=None) -> Card:
    return Card.load(cluster.admit(name, tmp_path / f"{name}.json", per_minute))


def raw_call(card: Card, server: str, body: bytes, metadata, timeout: float = 30.0):
    """A request of our own making to ``server``'s door (TLS as the card says)."""
    credentials = grpc.ssl_channel_credentials(root_certificates=card.doors[server]["certificate"].encode())
    with grpc.secure_channel(card.doors[server]["address"], credentials,
                             options=[("grpc.ssl_target_name_override", door_name(server))]) as channel:
        return channel.unary_unary(ASK)(body, metadata=metadata, timeout=timeout)


def query_metadata(card: Card, batch: int = 1, client_id: str = None, nonce: str = None):
    """A query's metadata, as the client sends it to both doors."""
    return (("token", card.token), ("client", client_id or new_client_id()), ("query", nonce or new_nonce()),
            ("batch", str(batch)))


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def error_of(call) -> Exception:
    try:
        call()
    except Exception as error:  # noqa: BLE001  (the test looks at which)
        return error
    raise AssertionError("no error")


def test_an_admitted_client_gets_the_plaintext_models_answers(cluster, serving, tmp_path, x_test):
    client = PrivateClient(card_for(cluster, tmp_path, "ana"))
    logits = client.predict_logits(x_test[:3])
    assert np.abs(logits - CHECK[:3]).max() < TOLERANCE
    # What crossed the network from this client: two shares of the images, two of the logits.
    assert client.bytes_sent == 2 * 3 * 28 * 28 * 8 and client.bytes_received == 2 * 3 * 10 * 8


def test_an_unknown_or_revoked_token_is_refused_at_the_door_within_a_second(cluster, serving, tmp_path, x_test):
    card = card_for(cluster, tmp_path, "bea")
    client = PrivateClient(card)
    client.predict_logits(x_test[:1])
    start = time.monotonic()
    with pytest.raises(NotAdmittedError, match="does not admit your token"):
        PrivateClient(replace(card, token=card.token[::-1])).predict_logits(x_test[:1])
    assert time.monotonic() - start < 1.0
    cluster.revoke("bea")
    start = time.monotonic()
    with pytest.raises(NotAdmittedError, match="revoked"):
        client.predict_logits(x_test[:1])
    assert time.monotonic() - start < 1.0


def test_a_door_without_the_cards_certificate_is_refused(cluster, serving, tmp_path, x_test):
    card = card_for(cluster, tmp_path, "carla")
    # Another service with a certificate of the same name: a card pins the door's very certificate.
    forged = dict(card.doors, server0=dict(card.doors["server0"], certificate=make_certificate("server0")[1].decode()))
    with pytest.raises(DoorError, match="did not show the certificate in your card"):
        PrivateClient(replace(card, doors=forged)).predict_logits(x_test[:1], timeout=10)


def test_a_token_over_its_limit_is_told_when_to_ask_again(cluster, serving, tmp_path, x_test):
    client = PrivateClient(card_for(cluster, tmp_path, "dario", per_minute=3))
    client.predict_logits(x_test[:2])
    client.predict_logits(x_test[2:3])
    with pytest.raises(NotAdmittedError, match=r"may send 3 images a minute .* try again in \d+ s"):
        client.predict_logits(x_test[3:4])


def test_malformed_and_oversized_requests_are_refused_at_the_door(cluster, serving, tmp_path):
    card = card_for(cluster, tmp_path, "elena")
    image = np.zeros((1, 28, 28, 1), "<i8").tobytes()
    good = (("token", card.token), ("client", new_client_id()), ("query", new_nonce()), ("batch", "1"))
    cases = {
        "no token": (good[1:], image, grpc.StatusCode.UNIMPLEMENTED),
        "no batch size": (good[:3], image, grpc.StatusCode.INVALID_ARGUMENT),
        "a batch size out of range": (good[:3] + (("batch", "65"),), image, grpc.StatusCode.INVALID_ARGUMENT),
        "a client id of another form": ((good[0], ("client", "../x")) + good[2:], image, grpc.StatusCode.INVALID_ARGUMENT),
        "no nonce": (good[:2] + good[3:], image, grpc.StatusCode.INVALID_ARGUMENT),
        "a nonce of another form": (good[:2] + (("query", "x" * 16),) + good[3:], image, grpc.StatusCode.INVALID_ARGUMENT),
        "fewer bytes than announced": (good, image[:-8], grpc.StatusCode.INVALID_ARGUMENT),
        "more bytes than announced": (good, image + image, grpc.StatusCode.INVALID_ARGUMENT),
        "more than any batch": (good, b"\0" * 5_000_000, grpc.StatusCode.RESOURCE_EXHAUSTED),
    }
    for what, (metadata, body, code) in cases.items():
        start = time.monotonic()
        error = refusal(lambda: raw_call(card, "server1", body, metadata))
        assert error.code() == code, (what, error.details())
        assert time.monotonic() - start < 1.0, what


def test_one_share_alone_at_server0s_door_is_refused_removed_and_holds_up_nobody(cluster, serving, tmp_path,
                                                                                 x_test):
    lone = card_for(cluster, tmp_path, "fede")
    client = PrivateClient(card_for(cluster, tmp_path, "gala"))
    client.predict_logits(x_test[:1])
    metadata = query_metadata(lone)
    key = query_key(digest(lone.token), metadata[1][1], metadata[2][1])
    hand = Hand(cluster.config_path)
    caught = []
    alone = threading.Thread(target=lambda: caught.append(refusal(lambda: raw_call(
        lone, "server0", np.zeros((1, 28, 28, 1), "<i8").tobytes(), metadata))))
    alone.start()
    try:
        time.sleep(0.5)  # the lone share is waiting for its twin at server0's door
        start = time.monotonic()
        logits = client.predict_logits(x_test[4:5])
        assert time.monotonic() - start < 5.0
        assert np.abs(logits - CHECK[4:5]).max() < TOLERANCE
    finally:
        alone.join(30)
    assert caught and caught[0].code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "did not receive the other share" in caught[0].details()
    wait_until(lambda: hand.staged(key) == [-1, -1], 5, "a server kept the share server0's door refused")


def test_slow_senders_hold_up_nobody(cluster, serving, tmp_path, x_test):
    client = PrivateClient(card_for(cluster, tmp_path, "hugo"))
    client.predict_logits(x_test[:1])
    host, port = cluster.config.door_address("server0")
    stalled = []
    try:
        for _ in range(100):  # each starts a TLS handshake and never finishes it
            connection = socket.create_connection((host, port), timeout=5)
            connection.sendall(b"\x16\x03\x01\x00\xc8\x01")
            stalled.append(connection)
        start = time.monotonic()
        logits = client.predict_logits(x_test[6:7])
        assert time.monotonic() - start < 5.0
        assert np.abs(logits - CHECK[6:7]).max() < TOLERANCE
    finally:
        for connection in stalled:
            connection.close()


def test_a_token_has_at_most_two_queries_waiting_even_after_malformed_ones(cluster, serving, tmp_path, x_test):
    card = card_for(cluster, tmp_path, "ivan")
    PrivateClient(card).predict_logits(x_test[:1])
    share = np.zeros((1, 28, 28, 1), "<i8").tobytes()
    for _ in range(3):  # refused: each must leave the count of waiting queries as it was
        metadata = query_metadata(card)
        assert refusal(lambda: raw_call(card, "server1", share[:-8], metadata)).code() == \
            grpc.StatusCode.INVALID_ARGUMENT
    credentials = grpc.ssl_channel_credentials(root_certificates=card.doors["server1"]["certificate"].encode())
    with grpc.secure_channel(card.doors["server1"]["address"], credentials,
                             options=[("grpc.ssl_target_name_override", door_name("server1"))]) as channel:
        ask = channel.unary_unary(ASK)
        # Shares sent to server1's door alone wait there, until server0's door gives up on them.
        waiting = [ask.future(share, metadata=query_metadata(card), timeout=20) for _ in range(2)]
        time.sleep(1)
        third = refusal(lambda: ask(share, metadata=query_metadata(card), timeout=5))
        for call in waiting:
            call.cancel()
    assert third.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, third.details()


def test_strangers_that_never_finish_their_calls_hold_up_nobody(cluster, serving, tmp_path, x_test):
    client = PrivateClient(card_for(cluster, tmp_path, "karl"))
    client.predict_logits(x_test[:1])
    card = client.card
    never = threading.Event()

    def nothing_yet():  # a request body that never comes
        never.wait(60)
        yield b""
    credentials = grpc.ssl_channel_credentials(root_certificates=card.doors["server0"]["certificate"].encode())
    with grpc.secure_channel(card.doors["server0"]["address"], credentials,
                             options=[("grpc.ssl_target_name_override", door_name("server0"))]) as channel:
        stalled = [channel.stream_unary(ASK).future(nothing_yet(), metadata=(("client", "0" * 32), ("batch", "1")),
                                                    timeout=60) for _ in range(100)]  # more than the door's threads
        try:
            start = time.monotonic()
            logits = client.predict_logits(x_test[7:8], timeout=30)
            assert time.monotonic() - start < 5.0
            assert np.abs(logits - CHECK[7:8]).max() < TOLERANCE
            assert all(call.exception(5).code() == grpc.StatusCode.UNIMPLEMENTED for call in stalled)
        finally:
            never.set()
            for call in stalled:
                call.cancel()


def test_waiting_for_the_model_to_be_served_costs_no_images_of_the_limit(tmp_path, x_test):
    with LocalCluster.start(base_port=find_free_base_port(), config_path=tmp_path / "cluster.json") as cluster:
        client = PrivateClient(Card.load(cluster.admit("luz", tmp_path / "card.json", per_minute=2)),
                               say=lambda line: None)
        answers = []
        # Nobody serves yet: the client asks the doors again every 0.2 s for two images.
        def ask():
            try:
                answers.append(client.predict_logits(x_test[:2], timeout=90))
            except Exception as error:  # noqa: BLE001  (the test shows which)
                answers.append(error)
        asking = threading.Thread(target=ask)
        asking.start()
        serving = start_serving_process(cluster.config_path)
        try:
            asking.join(90)
        finally:
            serving.stop()
        assert answers and isinstance(answers[0], np.ndarray), answers
        assert np.abs(answers[0] - CHECK[:2]).max() < TOLERANCE


def test_a_query_asked_while_nobody_serves_is_refused_and_leaves_no_share_on_either_server(tmp_path, x_test):
    # Nobody serves: both doors refuse, and neither server keeps a share. server1's door reads who serves before
    # it stages (staging while it read, tried, left a share whenever server0's door refused without its key).
    with LocalCluster.start(base_port=find_free_base_port(), config_path=tmp_path / "cluster.json") as cluster:
        client = PrivateClient(card_for(cluster, tmp_path, "quique"), say=lambda line: None)
        sent = []
        metadata_of = client._metadata
        client._metadata = lambda batch, nonce="": sent.append(dict(metadata_of(batch, nonce))) or metadata_of(batch, nonce)
        with pytest.raises(ServingStoppedError, match="nobody serves the model now"):
            client.predict_logits(x_test[:1], timeout=10)
        key = query_key(digest(client.card.token), sent[-1]["client"], sent[-1]["query"])
        hand = Hand(cluster.config_path)
        wait_until(lambda: hand.staged(key) == [-1, -1], PARTNER_SECONDS / 2,
                   "a share of a query refused because nobody serves stayed on a server")


def test_a_client_using_another_clients_id_gets_only_its_own_answers(cluster, serving, tmp_path, x_test):
    first = PrivateClient(card_for(cluster, tmp_path, "ines"))
    second = PrivateClient(card_for(cluster, tmp_path, "jorge"))
    second._client_id = first._client_id  # as if it had learned it: its token leads it to queues of its own
    answers = {}

    def ask(name, client, images):
        answers[name] = [client.predict_logits(images[i:i + 1]) for i in range(len(images))]
    threads = [threading.Thread(target=ask, args=("first", first, x_test[10:20])),
               threading.Thread(target=ask, args=("second", second, x_test[20:30]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert np.abs(np.concatenate(answers["first"]) - CHECK[10:20]).max() < TOLERANCE
    assert np.abs(np.concatenate(answers["second"]) - CHECK[20:30]).max() < TOLERANCE


@pytest.mark.parametrize("server", DOORS)
def test_a_doors_server_killed_is_named_to_the_waiting_client_within_15_s(tmp_path, server, x_test):
    with LocalCluster.start(base_port=find_free_base_port(), config_path=tmp_path / "cluster.json") as cluster:
        client = PrivateClient(Card.load(cluster.admit("kim", tmp_path / "card.json")), say=lambda line: None)
        failed = []
        # Nobody serves: the client waits for a serving side, asking the doors again and again.
        waiting = threading.Thread(target=lambda: failed.append(error_of(lambda: client.predict_logits(x_test[:1]))))
        waiting.start()
        time.sleep(1)
        cluster.processes[server].kill()
        killed = time.monotonic()
        waiting.join(30)
        assert failed, "the client was still waiting 30 s after the kill"
        assert time.monotonic() - killed < 15
        assert isinstance(failed[0], DoorError) and f"{server}'s door" in str(failed[0]), failed[0]


# -- a class on a network of its own ----------------------------------------------------------------

STUDENTS, EACH = 24, 3


def test_a_class_of_24_asks_one_served_model_at_once_and_a_stranger_gets_nothing(tmp_path):
    from netns import NamespacesUnavailable, VirtualNetwork
    from test_listen_guard import KNOCK, READ_A_FILE, attempt

    try:
        network = VirtualNetwork.create(("teacher", "class", "stranger"))
    except NamespacesUnavailable as reason:
        pytest.skip(f"no network namespaces here: {reason}")
    base = find_free_base_port()
    folder = tmp_path / "class"
    teacher = subprocess.Popen(
        [*network.launcher("teacher"), sys.executable, "-m", "private_predictions.commands.teach",
         "--students", str(STUDENTS), "--address", network.addresses["teacher"], "--base-port", str(base),
         "--folder", str(folder)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        said = []
        for line in teacher.stdout:
            said.append(line)
            if line.startswith("Press Ctrl-C"):
                break
        assert len(list(folder.glob("student-*.json"))) == STUDENTS, "".join(said)[-3000:]
        students = [subprocess.Popen(
            [*network.launcher("class"), sys.executable, "-m", "private_predictions.commands.predict",
             str(folder / f"student-{number + 1:02d}.json"), "--first", str(EACH * number), "--count", str(EACH),
             "--timeout", "120"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for number in range(STUDENTS)]
        for number, student in enumerate(students):
            stdout, stderr = student.communicate(timeout=300)
            assert student.returncode == 0, stderr[-2000:]
            answers = [json.loads(line) for line in stdout.splitlines()]
            expected = list(range(EACH * number, EACH * (number + 1)))
            assert [answer["index"] for answer in answers] == expected  # none lost, none duplicated
            # none crossed: another image's logits differ by far more than the rounding
            assert np.abs(np.array([answer["logits"] for answer in answers]) - CHECK[expected]).max() < TOLERANCE

        # A stranger on the same network: the doors are open, the servers' runtime is not.
        address = network.addresses["teacher"]
        ports = list(range(base, base + 5))
        assert json.loads(attempt(network, "stranger", KNOCK, address, json.dumps(ports), seconds=60)) == \
            [base + 3, base + 4]
        # Plain TensorFlow, as the runtime's own clients speak, at a door: nothing.
        assert "read:" not in attempt(network, "stranger", READ_A_FILE, f"{address}:{base + 3}",
                                      str(folder / "cluster.json"), seconds=20)
        # A gRPC client with the right certificate but no token: refused.
        card = Card.load(folder / "student-01.json")
        no_token = attempt(network, "stranger", NO_TOKEN, json.dumps(card.__dict__), seconds=30)
        assert no_token.strip() == "UNIMPLEMENTED", no_token  # refused before its body is read
        servers_folder = (folder / "servers").resolve()
        assert servers_folder.is_dir()
    finally:
        teacher.terminate()
        try:
            teacher.wait(30)
        finally:
            teacher.kill()
            network.remove()
    # Terminated as by Ctrl-C: nothing of the class is left running, nor in the temporary folder.
    assert teacher.returncode == 0 and not servers_folder.exists()


NO_TOKEN = """
import json, sys
import grpc
from private_predictions.client import ASK, door_name
card = json.loads(sys.argv[1])
door = card["doors"]["server0"]
channel = grpc.secure_channel(door["address"], grpc.ssl_channel_credentials(door["certificate"].encode()),
                              options=[("grpc.ssl_target_name_override", door_name("server0"))])
try:
    channel.unary_unary(ASK)(bytes(6272), metadata=(("client", "0" * 32), ("batch", "1")), timeout=10)
    print("ANSWERED")
except grpc.RpcError as error:
    print(error.code().name)
"""


def test_a_waiting_client_names_a_door_whose_cable_was_pulled_within_15_s(tmp_path, x_test):
    from netns import NamespacesUnavailable, VirtualNetwork

    try:
        network = VirtualNetwork.create(("teacher", "class"))
    except NamespacesUnavailable as reason:
        pytest.skip(f"no network namespaces here: {reason}")
    cluster = client = None
    try:
        cluster = subprocess.Popen([*network.launcher("teacher"), sys.executable, "-c", CLUSTER_ONLY,
                                    network.addresses["teacher"], str(tmp_path)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert cluster.stdout.readline() == "ready\n"
        # Nobody serves: the client waits, asking the doors again and again over the same connections.
        client = subprocess.Popen([*network.launcher("class"), sys.executable, "-c", WAIT_AND_TELL,
                                   str(tmp_path / "card.json")], stdout=subprocess.PIPE, text=True)
        assert client.stdout.readline() == "asked\n"
        time.sleep(2)
        network.run_in(network.namespace("teacher"), "ip", "link", "set", "eth0", "down")
        pulled = time.monotonic()
        told = client.stdout.readline()
        assert time.monotonic() - pulled < 15, told
        assert told.startswith("DoorError") and "door" in told and "not answering" in told, told
    finally:
        for process in (client, cluster):
            if process is not None:
                stop(process)
        network.remove()


CLUSTER_ONLY = """
import sys
from pathlib import Path
from private_predictions import LocalCluster
with LocalCluster.start(config_path=Path(sys.argv[2]) / "cluster.json", door_host=sys.argv[1]) as cluster:
    cluster.admit("lia", Path(sys.argv[2]) / "card.json")
    print("ready", flush=True)
    sys.stdin.readline()
"""
WAIT_AND_TELL = """
import sys, threading, time
import numpy as np
from private_predictions.client import PrivateClient
client = PrivateClient.connect(sys.argv[1], say=lambda line: None)
print("asked", flush=True)
try:
    client.predict_logits(np.zeros((1, 28, 28, 1)), timeout=60)
    print("answered", flush=True)
except Exception as error:
    print(type(error).__name__, error, flush=True)
"""


def test_the_client_imports_nothing_of_the_servers():
    # What a student's laptop runs: it must work where TensorFlow cannot be installed (CI also runs
    # notebook 03 in an environment without it: scripts/setup-client.sh).
    loaded = subprocess.run([sys.executable, "-c", "import sys, private_predictions.client, private_predictions.data, "
                             "private_predictions.plots; print(' '.join(sys.modules))"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert not {"tensorflow", "tf_encrypted", "private_predictions._tf"} & set(loaded)


def test_connect_waits_for_a_new_card_when_its_card_opens_nothing(cluster, serving, tmp_path, x_test):
    # A card left from servers that stopped (a killed kernel never deleted it), while notebook 02 is
    # about to admit the client again: connect says so at once, and takes the new card when it comes.
    path = tmp_path / "card.json"
    card_for(cluster, tmp_path, "card").save(path)
    stale = Card.load(path)
    forged = {server: dict(door, certificate=make_certificate(server)[1].decode()) for server, door in stale.doors.items()}
    replace(stale, doors=forged).save(path)
    said, connected = [], []
    connecting = threading.Thread(target=lambda: connected.append(PrivateClient.connect(path, timeout=60,
                                                                                         say=said.append)))
    connecting.start()
    try:
        deadline = time.monotonic() + 20
        while not said and time.monotonic() < deadline:
            time.sleep(0.1)
        assert said and "did not show the certificate" in said[0] and "Waiting up to" in said[0], said
        cluster.admit("card", path, per_minute=None)
    finally:
        connecting.join(60)
    assert connected, said
    assert np.abs(connected[0].predict_logits(x_test[8:9]) - CHECK[8:9]).max() < TOLERANCE


def test_a_clients_goodbye_ends_a_serving_for_one_client_once_its_answers_are_collected(tmp_path, x_test):
    # Notebook 02 serves until notebook 03 says it is done: no count of queries, no deadline between them.
    with LocalCluster.start(find_free_base_port(), config_path=tmp_path / "cluster.json") as cluster:
        serving = start_serving_process(cluster.config_path, options=["--until-done"])
        try:
            client = PrivateClient.connect(cluster.admit("learner", tmp_path / "card.json"), say=lambda line: None)
            for index in range(3):  # as often as the learner likes
                assert np.abs(client.predict_logits(x_test[index:index + 1]) - CHECK[index:index + 1]).max() < TOLERANCE
            said = []
            client.say = said.append
            client.done()
            assert serving.wait(30) == 0, "".join(serving.output)
            assert "The client said it is done: stopped serving after 3 queries.\n" in serving.output
            assert said == ["Told the servers you are done; this client is closed."]
            with pytest.raises(RuntimeError, match="This client is closed"):
                client.predict_logits(x_test[:1])
            later = PrivateClient.connect(tmp_path / "card.json", say=lambda line: None)
            with pytest.raises(ServingStoppedError, match="nobody serves the model now"):
                later.predict_logits(x_test[:1], timeout=5)
        finally:
            serving.stop()


def test_a_clients_goodbye_leaves_a_class_served(cluster, serving, tmp_path, x_test):
    # The teach command and the serve command serve everyone until their operator stops them.
    leaving = PrivateClient(card_for(cluster, tmp_path, "leaving"), say=lambda line: None)
    staying = PrivateClient(card_for(cluster, tmp_path, "staying"), say=lambda line: None)
    leaving.predict_logits(x_test[:1])
    leaving.done()
    assert serving.process.poll() is None
    assert np.abs(staying.predict_logits(x_test[9:10]) - CHECK[9:10]).max() < TOLERANCE


def test_goodbyes_count_against_the_tokens_limit(cluster, serving, tmp_path):
    # Each goodbye is a request the serving side must take: a token cannot send them without end.
    from private_predictions.client import DONE

    card = card_for(cluster, tmp_path, "waving", per_minute=2)
    credentials = grpc.ssl_channel_credentials(root_certificates=card.doors["server0"]["certificate"].encode())
    metadata = query_metadata(card, batch=0)
    with grpc.secure_channel(card.doors["server0"]["address"], credentials,
                             options=[("grpc.ssl_target_name_override", door_name("server0"))]) as channel:
        for _ in range(2):
            channel.unary_unary(DONE)(b"", metadata=metadata, timeout=10)
        refused = refusal(lambda: channel.unary_unary(DONE)(b"", metadata=metadata, timeout=10))
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED and "a minute" in refused.details()


def test_a_client_running_its_own_code_gets_answers_for_images_in_range_only(cluster, serving, tmp_path,
                                                                             x_test, monkeypatch):
    # Its shares can encode any words: the servers make every pixel one in [0, 1] before the first layer
    # (its 16 lowest bits), so what it learns is the model's answer on a valid image (the
    # value-range proof holds for those only).
    import private_predictions.client as client_module
    from private_predictions.model import load_logits_model

    monkeypatch.setattr(client_module, "validate_images", lambda images, *limits: images.astype(np.float64))
    client = PrivateClient(card_for(cluster, tmp_path, "mallory"))
    image = x_test[:1].astype(np.float64)
    one_pixel_huge = image.copy()
    one_pixel_huge[0, 14, 14, 0] = 2.0**20
    sent = {"negated": -image, "four times": 4 * image, "one pixel at 2^20": one_pixel_huge,
            "far below": np.full_like(image, -2.0**40)}
    plaintext = load_logits_model()
    scale = client.card.scaling_factor
    for name, images in sent.items():
        words = np.round(images * scale).astype(np.int64)  # as the client encodes them
        valid = np.clip((words & (2**16 - 1)) / scale, 0, 1)  # as the servers take them
        expected = plaintext(valid.astype(np.float32)).numpy()
        got = client.predict_logits(images)
        assert np.abs(got - expected).max() < TOLERANCE, name


# -- what an admitted client running its own code can do, and what it leaves --------------------------

def lone_shares(card: Card, count: int, batch: int = MAX_BATCH_SIZE, refused_partner: bool = False):
    """``count`` calls to server1's door alone, at once, each with a share of ``batch`` images; with their keys.

    With ``refused_partner``, each query's other share goes to server0's door announcing another batch
    size, which that door refuses: the share server1's door took is then its only part left.
    """
    channels, calls, keys = [], [], []
    share = np.zeros((batch, 28, 28, 1), "<i8").tobytes()
    for server in ("server1", "server0") if refused_partner else ("server1",):
        credentials = grpc.ssl_channel_credentials(root_certificates=card.doors[server]["certificate"].encode())
        channels.append(grpc.secure_channel(card.doors[server]["address"], credentials,
                                            options=[("grpc.ssl_target_name_override", door_name(server))]))
    for _ in range(count):
        metadata = query_metadata(card, batch)
        keys.append(query_key(digest(card.token), metadata[1][1], metadata[2][1]))
        calls.append(channels[0].unary_unary(ASK).future(share, metadata=metadata, timeout=60))
        if refused_partner:
            other = metadata[:3] + (("batch", "1"),)
            calls.append(channels[1].unary_unary(ASK).future(share[:len(share) // batch], metadata=other, timeout=60))
    return _Closing(channels), calls, keys


class _Closing:
    def __init__(self, channels):
        self.channels = channels

    def close(self):
        for channel in self.channels:
            channel.close()


def test_a_share_sent_to_server1s_door_alone_is_removed_and_its_client_told(cluster, serving, tmp_path):
    card = card_for(cluster, tmp_path, "nadia")
    channel, calls, keys = lone_shares(card, 1)
    hand = Hand(cluster.config_path)
    try:
        wait_until(lambda: hand.staged(keys[0])[1] != -1, 10, "server1's door did not stage the share")
        start = time.monotonic()
        error = calls[0].exception(30)
        # server0's door gives up on it after PARTNER_SECONDS, removes it, and server1's door tells its client.
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "did not receive the other share" in error.details()
        assert time.monotonic() - start < PARTNER_SECONDS + 2
        assert hand.staged(keys[0]) == [-1, -1]
    finally:
        channel.close()


def test_a_query_refused_at_server0s_door_is_refused_at_both_and_counted_once(cluster, serving, tmp_path, x_test):
    card = card_for(cluster, tmp_path, "olga", per_minute=2)
    hand = Hand(cluster.config_path)
    # Two shares to server1's door alone: they are removed, and count nothing against the limit ...
    channel, calls, keys = lone_shares(card, 2, batch=1)
    for call in calls:
        call.exception(30)
    channel.close()
    client = PrivateClient(card)
    assert np.abs(client.predict_logits(x_test[:2]) - CHECK[:2]).max() < TOLERANCE  # ... so two images pass
    # A third image is over the limit: server0's door refuses it, and server1's share of it goes too.
    sent = []
    metadata_of = client._metadata
    client._metadata = lambda batch, nonce="": sent.append(dict(metadata_of(batch, nonce))) or metadata_of(batch, nonce)
    with pytest.raises(NotAdmittedError, match="a minute"):
        client.predict_logits(x_test[2:3])
    key = query_key(digest(card.token), sent[-1]["client"], sent[-1]["query"])
    wait_until(lambda: hand.staged(key) == [-1, -1], 5, "server1 kept the share of a query server0 refused")


def test_greetings_count_against_the_tokens_limit(cluster, serving, tmp_path):
    client = PrivateClient(card_for(cluster, tmp_path, "pilar", per_minute=2))
    client.hello()
    client.hello()
    with pytest.raises(NotAdmittedError, match="a minute"):
        client.hello()


def test_calls_held_at_server1s_door_by_40_tokens_hold_up_nobody(cluster, serving, tmp_path, x_test):
    # Each token holds the two calls it may have in flight (shares whose twins never come), 80 in all:
    # none holds a thread while it waits, so another student's query is answered at once.
    student = PrivateClient(card_for(cluster, tmp_path, "quique"))
    student.predict_logits(x_test[:1])
    held = [lone_shares(card_for(cluster, tmp_path, f"holder-{number}"), 2, batch=1) for number in range(40)]
    try:
        time.sleep(1.0)  # every call is in, waiting at server1's door
        assert all(not call.done() for _, calls, _ in held for call in calls)
        start = time.monotonic()
        logits = student.predict_logits(x_test[11:12], timeout=30)
        assert time.monotonic() - start < 5.0
        assert np.abs(logits - CHECK[11:12]).max() < TOLERANCE
    finally:
        for channel, calls, _ in held:
            for call in calls:
                call.cancel()
            channel.close()


def server_memory(cluster, server: str) -> int:
    return psutil.Process(cluster.pids[server]).memory_info().rss


def test_lone_shares_are_removed_so_the_servers_memory_stops_growing(tmp_path, x_test):
    # A token's worst: its 2 queries at a time, each 64 images (400 kB), refused at server0's door after
    # server1's door took its share; 10 tokens. (Twins never sent at all are removed the same way, only
    # PARTNER_SECONDS later: the test above.)
    with LocalCluster.start(base_port=find_free_base_port(), config_path=tmp_path / "cluster.json") as cluster:
        serving = start_serving_process(cluster.config_path)
        try:
            cards = [card_for(cluster, tmp_path, f"flooder-{number}") for number in range(10)]
            hand = Hand(cluster.config_path)
            shares = 20 * MAX_BATCH_SIZE * 28 * 28 * 8  # 8 MB a round
            grown = []
            while len(grown) < 12 and not (len(grown) >= 4 and max(grown[-2:]) < shares / 4):
                before = server_memory(cluster, "server1")
                sent = [lone_shares(card, 2, refused_partner=True) for card in cards]
                for channel, calls, _ in sent:
                    for call in calls:
                        call.exception(60)
                    channel.close()
                assert all(hand.staged(key) == [-1, -1] for _, _, keys in sent for key in keys)
                grown.append(server_memory(cluster, "server1") - before)
            print(f"server1's memory grew by {[round(g / 1e6, 1) for g in grown]} MB in rounds of {shares / 1e6:.1f} MB")
            # The first rounds grow gRPC's, TensorFlow's and the allocator's pools (for up to a dozen rounds: a
            # door stages the shares that arrive together in one call, in one tensor of their size); then the
            # rounds reuse them, most adding 0.0 to 0.3 MB, and now and then one a few MB of the allocator's. Kept
            # for ever, each round's shares would add their 8 MB again, every round: within 12 rounds, two rounds
            # in a row must each add less than a quarter of that.
            assert len(grown) >= 4 and max(grown[-2:]) < shares / 4, grown
        finally:
            serving.stop()


def test_a_doors_calls_that_come_while_one_runs_run_together_and_each_gets_its_result():
    # A class's shares arrive together: a door stages them (and reads the lease for them) in one TensorFlow
    # call instead of one each. A lone call runs at once; a caller that left is not run; a failure reaches
    # only the callers it failed (at server0's door, the queries of one serving side).
    import asyncio
    from private_predictions.door import _Together

    runs, started, release = [], threading.Event(), threading.Event()

    def run(items):
        runs.append(list(items))
        started.set()
        if len(runs) == 1:
            assert release.wait(30), "the test never let the first call end"
        if "bad" in items:
            raise ValueError("a server failed")
        return [ValueError("its serving side stopped") if item == "gone" else len(items) for item in items]

    class Door:
        async def _quick(self, function, *args):
            return await asyncio.get_running_loop().run_in_executor(None, function, *args)

    async def scenario():
        together = _Together(Door(), run)
        first = asyncio.ensure_future(together("a"))
        assert await asyncio.get_running_loop().run_in_executor(None, started.wait, 30)
        others = [asyncio.ensure_future(together(item)) for item in "bcdx"]
        await asyncio.sleep(0)  # they are waiting now; the first call still runs
        others.pop().cancel()  # x's caller leaves (its client went): x is not run
        await asyncio.sleep(0)
        release.set()
        answers = [await first] + list(await asyncio.gather(*others))
        failed = await asyncio.gather(together("bad"), return_exceptions=True)
        fine, gone = asyncio.ensure_future(together("e")), asyncio.ensure_future(together("gone"))
        try:
            await gone
            mixed = [await fine, "gone was answered"]
        except ValueError as error:  # raised to its caller, not handed over as an answer
            mixed = [await fine, error]
        return answers, failed, mixed

    answers, failed, mixed = asyncio.run(scenario())
    assert runs == [["a"], ["b", "c", "d"], ["bad"], ["e", "gone"]]
    assert answers == [1, 3, 3, 3]
    assert isinstance(failed[0], ValueError)
    assert mixed[0] == 2 and isinstance(mixed[1], ValueError)  # a failure is its own


def test_a_door_takes_every_notice_there_in_one_call():
    from tensorflow.python.ops import gen_data_flow_ops
    from private_predictions._tf import tf
    from private_predictions.queues import all_waiting

    queue = gen_data_flow_ops.fifo_queue_v2(component_types=[tf.int64, tf.int64], shapes=[[], []], capacity=-1)
    for key, outcome in ((11, 1), (12, 8), (13, -1)):
        gen_data_flow_ops.queue_enqueue_v2(queue, [tf.constant(key, tf.int64), tf.constant(outcome, tf.int64)])
    keys, outcomes = all_waiting(queue)
    assert keys.numpy().tolist() == [11, 12, 13] and outcomes.numpy().tolist() == [1, 8, -1]
    gen_data_flow_ops.queue_enqueue_v2(queue, [tf.constant(14, tf.int64), tf.constant(64, tf.int64)])
    keys, outcomes = all_waiting(queue)
    assert keys.numpy().tolist() == [14] and outcomes.numpy().tolist() == [64]


def test_a_doors_notices_come_with_the_answers_they_announce_taken_from_the_table():
    from tensorflow.python.ops import gen_lookup_ops
    from private_predictions._tf import tf
    from private_predictions.queues import CLASSES, REFUSED, ServerTables, row_keys

    table = ServerTables("", 0)  # on this process
    answers = np.arange(4 * CLASSES, dtype=np.int64).reshape(4, CLASSES)
    # Query 21 answered (1 image), 22 refused, 23 answered (3 images): each says so once its rows are in.
    gen_lookup_ops.lookup_table_insert_v2(table.answers, row_keys(tf.constant([21, 23], tf.int64),
                                                                  tf.constant([1, 3], tf.int64)), answers)
    table.say(tf.constant([21, 22, 23], tf.int64), tf.constant([1, REFUSED, 3], tf.int64))
    keys, outcomes, rows = table.notices()
    assert keys.numpy().tolist() == [21, 22, 23] and outcomes.numpy().tolist() == [1, REFUSED, 3]
    np.testing.assert_array_equal(rows.numpy(), answers)  # in the notices' order, none for the refused query
    assert int(gen_lookup_ops.lookup_table_size_v2(table.answers)) == 0  # taken, not copied: nothing stays


def test_of_two_doors_failing_alike_the_client_names_server0s_whichever_it_called_first():
    # The client calls server1's door first (server0's door waits for its share); its words still follow DOORS.
    class Unreachable(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "failed to connect to all addresses"

    class Failed:
        def result(self, timeout=None):
            raise Unreachable()

        def cancel(self):
            pass

    called = []

    class Door:
        def __init__(self, server):
            self.server = server

        def future(self, body, metadata, timeout):
            called.append(self.server)
            return Failed()

    client = PrivateClient.__new__(PrivateClient)  # no card file, no channels: only the order and the words
    client.card = SimpleNamespace(token="t", doors={server: {"address": f"{server}.example:1"} for server in DOORS})
    client._stubs = {server: {ASK: Door(server)} for server in DOORS}
    client._client_id, client._closed = "0" * 32, False
    shares = (np.zeros((1, 28, 28, 1), np.int64),) * 2
    with pytest.raises(DoorError, match="^server0's door"):
        client._ask(shares, time.monotonic() + 5)
    assert called == ["server1", "server0"]
