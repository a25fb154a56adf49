"""What the serving side's computation reveals: only values masked by fresh randomness, never data."""
import inspect
import re
import threading

import numpy as np
from tf_encrypted.protocol.pond.pond import PondPrivateTensor

from private_predictions import LocalCluster, connect, load_logits_model, load_mnist, share_model
from private_predictions.client import Card, PrivateClient
from private_predictions._tf import tf

# Where a value is rebuilt from its two shares after fresh randomness was added to it (masking.py): the
# series' ReLU (relu.py: x + r for a uniform r, the comparison's numbers masked and rotated, the
# multiplication's operands minus random ones) and its truncation (truncation.py: x + L + r).
MASKING = {"open_masked"}


def test_the_serving_side_reveals_only_masked_values(tmp_path, monkeypatch):
    from tf_encrypted.protocol.pond.pond import Pond

    seen = []

    def recording(original):
        def recorded(self, *args, **kwargs):
            # Inside a traced function tf-encrypted's code runs as autograph's copies, named tf__NAME.
            seen.append({re.sub(r"^tf__", "", frame.function) for frame in inspect.stack()[1:80]})
            return original(self, *args, **kwargs)
        return recorded

    # The two ways tf-encrypted turns shares into a value: reveal() (what its QueueClient calls),
    # and the reconstruction inside its protocols.
    monkeypatch.setattr(Pond, "reveal", recording(Pond.reveal))
    monkeypatch.setattr(Pond, "_reconstruct", recording(Pond._reconstruct))
    (_, _), (x_test, _) = load_mnist()
    with LocalCluster.start(config_path=tmp_path / "c.json") as cluster:
        secure_model = share_model(load_logits_model(), connect(cluster.config))
        try:
            client = PrivateClient(Card.load(cluster.admit("tests", tmp_path / "card.json")), say=lambda line: None)
            serving = threading.Thread(target=secure_model.serve, args=(1,), kwargs={"report": None})
            serving.start()
            logits = client.predict_logits(x_test[:1], timeout=60)
            serving.join(60)
            assert logits.argmax() == load_logits_model()(x_test[:1]).numpy().argmax()
            # The hook saw the served computation (its ReLU does rebuild masked values),
            # and every reconstruction in it was of a masked value.
            assert seen
            assert all(frames & MASKING for frames in seen)

            # The same rule flags a plain reveal, as tf-encrypted's own QueueClient makes on the servers.
            seen.clear()
            secret = secure_model.protocol.define_private_variable(np.ones((1, 3)))
            tf.function(lambda: secret.reveal().to_native())()
            assert seen and not any(frames & MASKING for frames in seen)
        finally:
            secure_model.close()


def test_every_value_the_servers_open_on_the_64_bit_ring_is_uniformly_random(cluster, monkeypatch):
    """Record what each place in the code opens during one prediction of 32 images: bits 63 and 62 of
    uniform words are each set half the time (tf-encrypted's truncation, masked below 2^62, never sets them)."""
    from tf_encrypted.protocol.pond import pond

    opened = {}

    def record(value, kind):
        value = getattr(value, "value", value)  # tf-encrypted's own calls pass its tensor wrappers
        if value.dtype == tf.int64:  # the 64-bit ring (tf-encrypted's own calls included)
            # The calls that led here (autograph's copies while tracing: tf__NAME, at their own lines).
            callers = [f"{re.sub(r'^tf__', '', frame.function)}:{frame.lineno}" for frame in inspect.stack()
                       if "/tensorflow/" not in frame.filename and "/tf_encrypted/" not in frame.filename
                       and re.sub(r"^tf__", "", frame.function) not in ("record", "masking", "reconstructing")
                       and not re.search(r"_body(_\d+)?$", frame.function)][:3]  # autograph's loops and branches
            opened.setdefault(f"{kind} < {' < '.join(callers)}", []).append(value)

    def reconstructing(self, share0, share1):
        value = reconstruct(self, share0, share1)
        record(value, "open_masked")
        return value

    def masking(protocol, x):  # tf-encrypted's products open x - a for a uniform a from server2's triples
        masked = mask(protocol, x)
        record(masked.alpha_on_0.value, "product (x - a)")
        return masked

    reconstruct, mask = pond.Pond._reconstruct, pond._mask_private
    monkeypatch.setattr(pond.Pond, "_reconstruct", reconstructing)
    monkeypatch.setattr(pond, "_mask_private", masking)
    protocol = connect(cluster.config)
    secure_model = share_model(load_logits_model(), protocol)
    (_, _), (x_test, _) = load_mnist()
    encoded = np.round(x_test[:32] * protocol.fixedpoint_config.scaling_factor).astype(np.int64)

    @tf.function
    def predict():
        share0 = tf.constant(np.random.default_rng().integers(-2**63, 2**63, encoded.shape, dtype=np.int64))
        shares = []
        for share, server in ((share0, protocol.server_0), (encoded - share0, protocol.server_1)):
            with tf.device(server.device_name):
                shares.append(protocol.tensor_factory.tensor(tf.reshape(share, encoded.shape)))
        secure_model.network(PondPrivateTensor(protocol, *shares, True))
        return {site: [tf.reshape(value, [-1]) for value in values] for site, values in opened.items()}

    try:
        seen = predict()
    finally:
        secure_model.close()
    for site, values in seen.items():
        # server0 and server1 each open the same value (both need it): count it once. Counted twice,
        # a site's words are not independent, and the bound below is too tight by a factor of sqrt(2)
        # (seen: bit 63 set in 0.5064 of a ReLU's 163,456 words, "5.2 standard deviations").
        distinct = {value.numpy().tobytes(): value.numpy() for value in values}
        words = np.concatenate(list(distinct.values())).view(np.uint64)
        for bit in (63, 62):
            share = float(((words >> np.uint64(bit)) & np.uint64(1)).mean())
            # Binomial: a uniform bit is set in half the words, give or take 5 standard deviations.
            assert abs(share - 0.5) < 5 * 0.5 / np.sqrt(len(words)), (site, bit, share, len(words))
    assert any("< truncate" in site for site in seen) and any("< relu" in site for site in seen), list(seen)
    assert any("< product" in site for site in seen), list(seen)  # product.py opens x - a through open_masked


def _party(device: str) -> str:
    found = re.search(r"/job:(\w+)/replica:0/task:(\d)", device or "")
    if found is None:
        return "unplaced" if not device else device
    return f"server{found.group(2)}" if found.group(1) == "tfe" else "this process"


def test_what_crosses_between_servers_is_masked_openings_seeds_and_what_server2_deals(cluster):
    """A walk of the traced network: every tensor made on one server and used on another."""
    protocol = connect(cluster.config)
    secure_model = share_model(load_logits_model(), protocol)
    shape = (1, 28, 28, 1)

    @tf.function
    def predict():
        shares = []
        for server in (protocol.server_0, protocol.server_1):
            with tf.device(server.device_name):
                shares.append(protocol.tensor_factory.tensor(tf.zeros(shape, tf.int64)))
        y0, y1 = secure_model.network(PondPrivateTensor(protocol, *shares, True)).unwrapped
        return y0.value, y1.value

    try:
        graph = predict.get_concrete_function().graph
    finally:
        secure_model.close()
    crossings, returned = [], {tensor.op for tensor in graph.outputs}
    for op in graph.get_operations():
        for tensor in () if op in returned else op.inputs:  # the two output shares, handed back here
            source, destination = _party(tensor.op.device), _party(op.device)
            if source.startswith("server") and source != destination:
                crossings.append((source, destination, tensor, op))
    servers = {"server0", "server1"}
    assert {(s, d) for s, d, _, _ in crossings} >= {("server0", "server1"), ("server1", "server0"),
                                                    ("server0", "server2"), ("server2", "server1")}
    for source, destination, tensor, op in crossings:
        what = f"{tensor.name} ({tensor.dtype.name}) from {source} to {destination}, into {op.name}"
        # Every op that uses a server's tensor is placed: nothing moves between servers unseen.
        assert destination != "unplaced", what
        if destination == "server2":
            # The comparison's small numbers, masked, rotated and packed in 32-bit words by the compiled step
            # (relu._answer): nothing of the ring.
            assert source in servers and tensor.dtype == tf.int32 and tensor.op.type == "PartitionedCall", what
        elif source in servers and destination in servers:
            # open_masked (relu.py, truncation.py), and tf-encrypted's products: x - a, a from server2.
            masked_opening = re.search(r"(^|/)(reconstruct(_\d+)?|mask(_\d+)?/online)/", op.name) and tensor.dtype == tf.int64
            seed = tensor.op.type == "SecureSeed"
            assert masked_opening or seed, what
    # What server2 sends goes to one server only: a seed that reached both would give both servers the same half
    # of a mask (r = 2 r0, and server0 would open x + 2 r0), and a share that reached both would be no share.
    destinations = {}
    for source, destination, tensor, _ in crossings:
        if source == "server2":
            destinations.setdefault(tensor.name, (tensor, set()))[1].add(destination)
    assert destinations
    for name, (tensor, to) in destinations.items():
        what = f"{name} ({tensor.dtype.name} {tensor.shape}) from server2 to {', '.join(sorted(to))}"
        assert to <= servers and len(to) == 1, what
