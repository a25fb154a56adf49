"""The three servers, the model owner and the client on five hosts of their own; the client goes through the doors."""
import json
import subprocess
import sys

import numpy as np

from private_predictions import load_logits_model, load_mnist
from private_predictions.admission import write_card
from private_predictions.config import SERVER_NAMES, ClusterConfig
from private_predictions.tooling import start_serving_process

FIRST, COUNT = 20, 3


def test_a_private_prediction_with_each_party_on_a_host_of_its_own(network, servers_on_hosts):
    config_path = servers_on_hosts
    serving = start_serving_process(config_path, launcher=network.launcher("owner"))
    card = config_path.parent / "card.json"
    write_card(ClusterConfig.load(config_path), config_path.parent, "client", card, per_minute=None)
    try:
        traffic_before = {name: network.bytes_through(name) for name in SERVER_NAMES}
        query = subprocess.run(
            [*network.launcher("client"), sys.executable, "-m", "private_predictions.commands.predict",
             str(card), "--first", str(FIRST), "--count", str(COUNT), "--timeout", "50"],
            capture_output=True, text=True, timeout=55)
    finally:
        serving.stop()
    assert query.returncode == 0, query.stderr[-2000:]

    answers = [json.loads(line) for line in query.stdout.splitlines()]
    (_, _), (x_test, _) = load_mnist()
    plain = load_logits_model()(x_test[FIRST:FIRST + COUNT]).numpy()
    assert [a["index"] for a in answers] == list(range(FIRST, FIRST + COUNT))
    assert np.abs(np.array([a["logits"] for a in answers]) - plain).max() < 0.02
    # Each server exchanged shares over its own cable: SecureNN's ReLUs alone are megabytes.
    for name in SERVER_NAMES:
        assert network.bytes_through(name) - traffic_before[name] > 1_000_000, name
