"""What the serving side's computation reveals: only values masked by fresh randomness, never data."""
import inspect
import re
import threading

import numpy as np

from private_predictions import LocalCluster, PrivateClient, connect, load_logits_model, load_mnist, share_model
from private_predictions._tf import tf

# Where a value is rebuilt from its two shares after fresh randomness was added to it: tf-encrypted's
# interactive truncation (a statistical mask) and the series' ReLU (relu.py: x + r for a random r,
# the comparison's numbers masked and rotated, the multiplication's operands minus random ones).
MASKING = {"_truncate_private_interactive", "_open_masked"}


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
            client = PrivateClient(secure_model.protocol, cluster.config, say=lambda line: None)
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
