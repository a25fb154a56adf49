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

import grpc
import numpy as np
import pytest

from private_predictions.certificates import make_certificate
from private_predictions.client import (ASK, CHANNEL_OPTIONS, DOORS, Card, DoorError, NotAdmittedError,
                                        PrivateClient, ServingStoppedError, door_name, new_client_id)
from private_predictions.data import load_mnist
from private_predictions.paths import CHECK_LOGITS_PATH
from private_predictions.ports import find_free_base_port
from private_predictions.tooling import start_serving_process
from private_predictions.waiting import wait_until
from private_predictions import LocalCluster
from conftest import stop

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
    good = (("token", card.token), ("client", new_client_id()), ("batch", "1"))
    cases = {
        "no token": ((("client", new_client_id()), ("batch", "1")), image, grpc.StatusCode.UNIMPLEMENTED),
        "no batch size": (good[:2], image, grpc.StatusCode.INVALID_ARGUMENT),
        "a batch size out of range": (good[:2] + (("batch", "65"),), image, grpc.StatusCode.INVALID_ARGUMENT),
        "a client id of another form": ((good[0], ("client", "../x"), good[2]), image, grpc.StatusCode.INVALID_ARGUMENT),
        "fewer bytes than announced": (good, image[:-8], grpc.StatusCode.INVALID_ARGUMENT),
        "more bytes than announced": (good, image + image, grpc.StatusCode.INVALID_ARGUMENT),
        "more than any batch": (good, b"\0" * 5_000_000, grpc.StatusCode.RESOURCE_EXHAUSTED),
    }
    for what, (metadata, body, code) in cases.items():
        start = time.monotonic()
        error = refusal(lambda: raw_call(card, "server1", body, metadata))
        assert error.code() == code, (what, error.details())
        assert time.monotonic() - start < 1.0, what


def test_one_share_alone_is_refused_and_holds_up_nobody(cluster, serving, tmp_path, x_test):
    lone = card_for(cluster, tmp_path, "fede")
    client = PrivateClient(card_for(cluster, tmp_path, "gala"))
    client.predict_logits(x_test[:1])
    metadata = (("token", lone.token), ("client", new_client_id()), ("batch", "1"))
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
        metadata = (("token", card.token), ("client", new_client_id()), ("batch", "1"))
        assert refusal(lambda: raw_call(card, "server1", share[:-8], metadata)).code() == \
            grpc.StatusCode.INVALID_ARGUMENT
    credentials = grpc.ssl_channel_credentials(root_certificates=card.doors["server1"]["certificate"].encode())
    with grpc.secure_channel(card.doors["server1"]["address"], credentials,
                             options=[("grpc.ssl_target_name_override", door_name("server1"))]) as channel:
        ask = channel.unary_unary(ASK)
        # Shares sent to server1's door alone wait there for an answer that never comes.
        waiting = [ask.future(share, metadata=(("token", card.token), ("client", new_client_id()), ("batch", "1")),
                              timeout=20) for _ in range(2)]
        time.sleep(1)
        third = refusal(lambda: ask(share, metadata=(("token", card.token), ("client", new_client_id()),
                                                     ("batch", "1")), timeout=5))
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
    metadata = (("token", card.token), ("client", new_client_id()), ("batch", "0"))
    with grpc.secure_channel(card.doors["server0"]["address"], credentials,
                             options=[("grpc.ssl_target_name_override", door_name("server0"))]) as channel:
        for _ in range(2):
            channel.unary_unary(DONE)(b"", metadata=metadata, timeout=10)
        refused = refusal(lambda: channel.unary_unary(DONE)(b"", metadata=metadata, timeout=10))
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED and "a minute" in refused.details()


def test_the_doors_watch_never_closes_the_queues_of_a_wait_that_has_returned():
    # The race behind a class's query failing now and then ("the servers could not take this query"): the
    # watch looked at the waits; a query's answer came and its call ended; the watch then saw the call ended,
    # took it for a client that left, and closed that client's answer queue, which its next query waits on.
    from types import SimpleNamespace

    from private_predictions.door import Door

    door = Door.__new__(Door)  # the waits and their watch only, no servers
    door._waits, door._ended, door._waits_lock = {}, {}, threading.Lock()
    door._serving = lambda: "the serving side"
    answered, closed, returned = threading.Event(), [], []

    class Session:
        def run(self, fetch, *args, **kwargs):
            if fetch == "close":
                closed.append(fetch)
                return None
            answered.wait(10)
            return "the answer"

    class Call:
        def is_active(self):  # asked by the watch: the answer comes, and the call ends, just before
            answered.set()
            waiting.join(10)
            return False

    client = SimpleNamespace(session=Session(), close="close")
    waiting = threading.Thread(target=lambda: returned.append(
        door._wait(client, "take the answer", Call(), "the serving side", 600, "no answer in time")))
    waiting.start()
    wait_until(lambda: door._waits, 10, "the wait did not start")
    door._end_waits()
    assert returned == ["the answer"] and closed == []


def test_a_client_running_its_own_code_gets_answers_for_images_in_range_only(cluster, serving, tmp_path,
                                                                             x_test, monkeypatch):
    # Its shares can encode any words: the servers clip every pixel to [0, 1] before the first layer, so
    # what it learns is the model's answer on a valid image (the value-range proof holds for those only).
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
    for name, images in sent.items():
        expected = plaintext(np.clip(images, 0, 1).astype(np.float32)).numpy()
        got = client.predict_logits(images)
        assert np.abs(got - expected).max() < TOLERANCE, name
