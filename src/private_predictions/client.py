"""The client: ask the served model about your images without showing them to anyone.

This module reads on its own, and needs only numpy and grpc: no TensorFlow, nothing of
the servers. A query takes three steps:

1. ``share``: encode every pixel as a whole number (fixed point) and split it into two
   shares, a uniformly random one and the difference, each alone pure noise;
2. send one share to server0's *door* and the other to server1's, over TLS, with the
   token from your card; each door passes its share to its server, and returns that
   server's share of the answer;
3. ``reconstruct``: add the two shares of the answer up, here, on your device.

Your *card* (a small JSON file from the model owner) says where the two doors are, which
certificate each must show (no other is accepted), your token, and how numbers are encoded.
"""
import json
import os
import time
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

# grpcio 1.80 to 1.85, once a channel has been used, can crash a child process between its fork and
# its exec (grpc/grpc#43055): seen here in 5 of 400 subprocess.Popen calls, in 0 of 400 with fork
# support off. Neither the client nor the doors ever use gRPC in a forked child. Set before grpc loads.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from .paths import CARD_PATH, shown  # noqa: E402

# What travels through a door: gRPC, raw bytes. A query's body is one share, little-endian 64-bit
# integers of shape (batch, 28, 28, 1); the answer, one share of the logits. Metadata: the token, the
# batch size, a client id (32 hex digits) and a fresh random nonce per query (16 hex digits), from which
# both doors derive the query's key on the servers. A door takes one query of a client id at a time:
# after a failed query a client draws a new id, so as not to wait for its earlier query to end there.
SERVICE = "private_predictions.Door"
ASK, HELLO = f"/{SERVICE}/Ask", f"/{SERVICE}/Hello"
DONE = f"/{SERVICE}/Done"  # to server0's door only, with batch 0: "this client has no more questions"
COSTS = f"/{SERVICE}/Costs"  # to server0's door only: what the model owner publishes about a batch size (JSON)
WORD = np.dtype("<i8")
DOORS = ("server0", "server1")
NOT_SERVING = "not serving: "  # how a door's refusal starts when nobody serves the model right now
NOT_PUBLISHED = "not published: "  # ... when nothing is published yet about the batch size asked
SERVER_SILENT = "server silent: "  # ... when one of the three servers does not answer
QUICK_SECONDS = 10.0
# Ping a door every 2 s while waiting: a door that went silent (cable, Wi-Fi, sleep) is noticed
# within seconds instead of at the query's deadline. The doors accept pings that often.
CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", 2000), ("grpc.keepalive_timeout_ms", 3000),
                   ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]


class InvalidImageError(ValueError):
    """The images cannot be sent: the message says what is wrong with them."""


class DoorError(ConnectionError):
    """A door could not be reached, or did not show the certificate in the card."""


class NotAdmittedError(PermissionError):
    """A door refused the token: unknown, revoked, or over its limit."""


class RequestRefusedError(RuntimeError):
    """A door or the serving side refused this request."""


class ServingStoppedError(RuntimeError):
    """Nobody serves the model (any more): the model owner must serve it (notebook 02)."""


class ServerSilentError(ServingStoppedError):
    """One of the three servers does not answer: the message names it."""


def door_name(server: str) -> str:
    """The name in a door's certificate: the card pins the certificate, whatever address it is reached at."""
    return f"{server}.door.private-predictions"


@dataclass(frozen=True)
class Costs:
    """What the model owner publishes about a batch size: what the plaintext model takes on its machine,
    and how many bytes the three servers send each other to answer a query of that size."""
    batch: int  # the size the servers compute at: the batch asked, padded up to 1, 8, 32 or 64
    plaintext_seconds: Optional[float]  # None if the model owner did not time it
    servers_bytes: int


@dataclass(frozen=True)
class Card:
    """What a client needs to know: the doors, their certificates, its token, the encoding."""
    name: str
    token: str = field(repr=False)  # admits whoever holds it: never printed
    doors: Dict[str, Dict[str, str]]  # server -> {"address": "host:port", "certificate": PEM}
    scaling_factor: int
    image_shape: tuple
    max_batch: int

    @classmethod
    def load(cls, path) -> "Card":
        fields = json.loads(Path(path).read_text())
        if set(fields.get("doors", {})) != set(DOORS):
            raise ValueError(f"{path} is not a card: it must name the doors of {DOORS}")
        return cls(**dict(fields, image_shape=tuple(fields["image_shape"])))

    def save(self, path) -> None:
        """Only its owner may read it: the token in it admits whoever holds it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600, new
        with os.fdopen(handle, "w") as file:
            json.dump(dict(self.__dict__, image_shape=list(self.image_shape)), file, indent=2)
        os.replace(temporary, path)


def validate_images(images, shape=(28, 28, 1), max_batch: int = 64) -> np.ndarray:
    """Check a batch before anything leaves this device; return it as float64."""
    if not isinstance(images, np.ndarray):
        raise InvalidImageError(f"images must be a NumPy array, got {type(images).__name__}. "
                                "Stack them first, e.g. np.stack(list_of_images).")
    if images.dtype.kind not in "fiu":
        raise InvalidImageError(f"images must hold numbers, got dtype {images.dtype}")
    if images.ndim != 1 + len(shape) or images.shape[1:] != tuple(shape):
        raise InvalidImageError(f"images must have shape (batch, {', '.join(map(str, shape))}), got "
                                f"{images.shape}. For one image x of shape (28, 28) use x.reshape(1, 28, 28, 1).")
    if images.shape[0] == 0:
        raise InvalidImageError("the batch is empty: send at least one image")
    if images.shape[0] > max_batch:
        raise InvalidImageError(f"a batch of {images.shape[0]} images is larger than the {max_batch} the "
                                "servers accept; split it into smaller batches")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise InvalidImageError("images contain NaN or infinite values")
    if images.min() < 0 or images.max() > 1:
        raise InvalidImageError(f"pixel values must lie in [0, 1], got [{images.min()}, {images.max()}]; "
                                "divide 0-255 images by 255")
    return images.astype(np.float64)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def random_words(shape) -> np.ndarray:
    """Uniformly random 64-bit words from the operating system's secure source (never numpy's generator)."""
    count = int(np.prod(shape))
    return np.frombuffer(os.urandom(8 * count), dtype=WORD).reshape(shape).copy()


def _identity(path: Path):
    """What tells one version of a file from the next (a card is replaced whole, never edited)."""
    try:
        stat = path.stat()
        return stat.st_ino, stat.st_mtime_ns, stat.st_size
    except FileNotFoundError:
        return None


def _changed(path: Path, seen, deadline: float) -> bool:
    """Wait until ``path`` is no longer the version ``seen`` (None: absent); False if ``deadline`` came first."""
    while _identity(path) == seen:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def new_client_id() -> str:
    return os.urandom(16).hex()


def new_nonce() -> str:
    return os.urandom(8).hex()


class PrivateClient:
    """Ask the served model for predictions without showing it the images."""

    def __init__(self, card: Card, say=print):
        self.card, self.say = card, say
        self._channels = {}
        self._stubs = {}
        for server in DOORS:
            credentials = grpc.ssl_channel_credentials(root_certificates=card.doors[server]["certificate"].encode())
            channel = grpc.secure_channel(card.doors[server]["address"], credentials, options=CHANNEL_OPTIONS + [
                ("grpc.ssl_target_name_override", door_name(server))])
            self._channels[server] = channel
            self._stubs[server] = {method: channel.unary_unary(method) for method in (ASK, HELLO, DONE, COSTS)}
        # Names this client's queues on the servers (with the token); fresh after any failure, so a late
        # answer to an abandoned query can never be taken for the next one's.
        self._client_id = new_client_id()
        self.bytes_sent = self.bytes_received = 0
        self._served = self._closed = False

    @classmethod
    def connect(cls, card_path=CARD_PATH, timeout: float = 120.0, say=print) -> "PrivateClient":
        """Read the card at ``card_path`` (waiting up to ``timeout`` s for it) and greet both doors."""
        card_path, deadline = Path(card_path), time.monotonic() + timeout
        if not card_path.exists():
            say(f"Waiting up to {timeout:.0f} s for your card, {shown(card_path)} (notebook 02 writes it "
                "when it admits you; in a class, the teacher gives it to you)...")
            if not _changed(card_path, None, deadline):
                raise FileNotFoundError(f"No card at {shown(card_path)}. Run notebook 02 up to its admit cell, "
                                        "or copy the card the teacher gave you there.")
        while True:
            seen = _identity(card_path)
            client = cls(Card.load(card_path), say)
            try:
                client.hello(min(QUICK_SECONDS, max(1.0, deadline - time.monotonic())))
                return client
            except (DoorError, NotAdmittedError) as error:
                # A card left from servers that have stopped, or revoked: notebook 02 (or the teacher) may
                # be about to write a new one. Wait for it, within the same time, and say so at once.
                client.close()
                if time.monotonic() > deadline:
                    raise
                say(f"{error}\nWaiting up to {deadline - time.monotonic():.0f} s for a new card at "
                    f"{shown(card_path)} (notebook 02 writes one when it admits you)...")
                if not _changed(card_path, seen, deadline):
                    raise error from None

    def __repr__(self):
        doors = ", ".join(f"{server}={door['address']}" for server, door in self.card.doors.items())
        return f"PrivateClient({self.card.name!r}: doors {doors}, TLS with the card's certificates)"

    def hello(self, timeout: float = QUICK_SECONDS) -> None:
        """Check that both doors answer, show the card's certificates, and admit its token."""
        self._check_open()
        calls = {server: self._stubs[server][HELLO].future(b"", metadata=self._metadata(0), timeout=timeout)
                 for server in DOORS}
        self._collect(calls, time.monotonic() + timeout)

    def share(self, images: np.ndarray):
        """Split fixed-point encoded images into two shares, on this device.

        share0 is uniformly random; share1 = encoded - share0 (mod 2^64, numpy's int64
        arithmetic wraps around). Either one alone says nothing about the images.
        """
        encoded = np.round(images * self.card.scaling_factor).astype(np.int64)
        share0 = random_words(encoded.shape)
        return share0, encoded - share0

    def reconstruct(self, share0: np.ndarray, share1: np.ndarray) -> np.ndarray:
        """Add two shares (mod 2^64) and decode the fixed-point result."""
        return (share0 + share1) / self.card.scaling_factor

    def predict_logits(self, images: np.ndarray, timeout: float = 120.0) -> np.ndarray:
        """Private logits for a batch of images of shape (n, 28, 28, 1) with values in [0, 1]."""
        images = validate_images(images, self.card.image_shape, self.card.max_batch)
        shares = self.share(images)
        deadline, waiting_said = time.monotonic() + timeout, False
        while True:
            try:
                answer0, answer1 = self._ask(shares, deadline)
                self._served = True
                return self.reconstruct(answer0, answer1).reshape(len(images), -1)
            except ServingStoppedError as error:
                # Nobody served this client yet (02 still starting): wait for it, within this query's
                # time. Once served, a stop is told at once: nobody waits two minutes to learn it.
                if self._served or time.monotonic() > deadline or isinstance(error, ServerSilentError):
                    raise
                if not waiting_said:
                    self.say(f"Waiting up to {max(0, deadline - time.monotonic()):.0f} s for the model to be "
                             "served (the serve cell of notebook 02)...")
                    waiting_said = True
                time.sleep(0.2)

    def published_costs(self, batch: int, timeout: float = QUICK_SECONDS) -> Costs:
        """What the model owner publishes about batches of ``batch`` images (asked of server0's door)."""
        self._check_open()
        call = self._stubs["server0"][COSTS].future(b"", metadata=self._metadata(batch), timeout=timeout)
        answer = self._collect({"server0": call}, time.monotonic() + timeout)["server0"]
        return Costs(**json.loads(answer))

    def predict(self, images: np.ndarray, timeout: float = 120.0) -> np.ndarray:
        """Private class probabilities: the softmax is applied here, on the client."""
        return softmax(self.predict_logits(images, timeout))

    def _metadata(self, batch: int, nonce: str = ""):
        return (("token", self.card.token), ("client", self._client_id), ("query", nonce or new_nonce()),
                ("batch", str(batch)))

    def _ask(self, shares, deadline: float):
        """Send share i to server i's door, both at once; return the two shares of the answer."""
        self._check_open()
        batch, nonce = len(shares[0]), new_nonce()  # the same nonce at both doors: one query
        bodies = [share.astype(WORD).tobytes() for share in shares]
        calls = {}
        # server1's door first: server0's door waits for it to stage its share before it takes the query.
        for server, body in reversed(list(zip(DOORS, bodies))):
            calls[server] = self._stubs[server][ASK].future(body, metadata=self._metadata(batch, nonce),
                                                            timeout=max(0.1, deadline - time.monotonic()))
        calls = {server: calls[server] for server in DOORS}  # then waited for, and explained, in DOORS order
        try:
            answers = self._collect(calls, deadline)
        except BaseException:
            self._client_id = new_client_id()  # the servers may still answer the abandoned query
            raise
        self.bytes_sent += sum(map(len, bodies))
        self.bytes_received += sum(map(len, answers.values()))
        return [np.frombuffer(answers[server], dtype=WORD).astype(np.int64) for server in DOORS]

    def _collect(self, calls, deadline: float):
        """Wait for every call, a little at a time so that an interrupt is never held up.

        If one fails, the others get a second to finish, and the gravest failure is raised, in
        words: a door that cannot be reached says more than its twin's "nobody serves".
        """
        results = {}
        try:
            while len(results) < len(calls):
                for server, call in calls.items():
                    if server in results:
                        continue
                    try:
                        results[server] = call.result(timeout=0.05)
                    except grpc.FutureTimeoutError:
                        if time.monotonic() > deadline + 1:
                            raise TimeoutError(f"No answer from {server}'s door in time.") from None
                    except grpc.RpcError:
                        raise self._gravest(calls) from None
        finally:
            for call in calls.values():
                call.cancel()
        return results

    def _gravest(self, calls) -> Exception:
        errors = []
        for server in calls:  # in DOORS order: of two failures alike, server0's door's words are given
            try:
                calls[server].result(timeout=1.0)
            except grpc.RpcError as error:
                errors.append(self._explain(server, error))
            except grpc.FutureTimeoutError:
                pass
        order = (DoorError, NotAdmittedError, RequestRefusedError, TimeoutError, ServingStoppedError)
        return min(errors, key=lambda error: next(i for i, kind in enumerate(order + (Exception,))
                                                  if isinstance(error, kind)))

    def _explain(self, server: str, error: grpc.RpcError) -> Exception:
        code, details = error.code(), error.details() or ""
        address = self.card.doors[server]["address"]
        if code == grpc.StatusCode.UNIMPLEMENTED:  # what a door answers before it reads a stranger's call
            return NotAdmittedError(f"{server}'s door does not admit your token: it is unknown there, or "
                                    "was revoked. Ask the model owner for a new card (on one machine: run "
                                    "notebook 02's admit cell again).")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
            return RequestRefusedError(f"{server}'s door refused this request: it is larger than a batch of the "
                                       f"{self.card.max_batch} images the servers accept")
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.RESOURCE_EXHAUSTED):
            return NotAdmittedError(f"{server}'s door refused: {details}")
        if code == grpc.StatusCode.FAILED_PRECONDITION and details.startswith(NOT_SERVING):
            return ServingStoppedError(details[len(NOT_SERVING):])
        if code == grpc.StatusCode.FAILED_PRECONDITION and details.startswith(NOT_PUBLISHED):
            return LookupError(details[len(NOT_PUBLISHED):])
        if code == grpc.StatusCode.UNAVAILABLE and details.startswith(SERVER_SILENT):
            return ServerSilentError(details[len(SERVER_SILENT):])
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
            return RequestRefusedError(f"{server}'s door refused this request: {details}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return TimeoutError(f"No answer from the served model in time (through {server}'s door, {address}). "
                                "Is notebook 02 serving (its serve cell)?")
        if any(word in details.lower() for word in ("ssl", "handshake", "certificate", "tls")):
            return DoorError(f"{server}'s door at {address} did not show the certificate in your card: it may be "
                             "someone else's service, or the servers were restarted since your card was made. "
                             "Get a new card.")
        return DoorError(f"{server}'s door ({address}) is not answering ({details or code.name}). Check that "
                         "the servers run (notebook 02) and that this device reaches that address.")

    def done(self, timeout: float = QUICK_SECONDS) -> None:
        """Tell the servers you have no more questions, and close this client.

        A model served for you alone (notebook 02's serve cell) stops serving; a class's
        serving goes on for the others.
        """
        self._check_open()
        call = self._stubs["server0"][DONE].future(b"", metadata=self._metadata(0), timeout=timeout)
        try:
            self._collect({"server0": call}, time.monotonic() + timeout)
            self.say("Told the servers you are done; this client is closed.")
        except ServingStoppedError:
            self.say("Nobody serves the model now, so there was nothing to stop; this client is closed.")
        finally:
            self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("This client is closed: you said you are done. To ask again, run notebook 02 "
                               "again from the top (in a class, the teacher's servers still serve you), then "
                               "notebook 03's connect cell.")

    def close(self) -> None:
        self._closed = True
        for channel in self._channels.values():
            channel.close()
