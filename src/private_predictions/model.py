"""Loading the trained network (defined and trained in notebook 01) for the servers."""
from pathlib import Path

from ._tf import tf
from .paths import MODEL_PATH


def load_logits_model(path: Path = MODEL_PATH):
    """The saved model with its final softmax dropped: what the servers compute.

    The servers return logits; the client applies the softmax itself, on its own device,
    where it costs nothing and reveals nothing.
    """
    if not Path(path).exists():
        raise FileNotFoundError(
            f"No trained model at {path}. Run notebook 01 (public training) first, "
            "or restore the committed one with `git checkout -- models/`."
        )
    return logits_of(tf.keras.models.load_model(path), path)


def logits_of(trained, name="the model"):
    """The same network and weights, with the final softmax dropped (the exercises use it too)."""
    config = trained.get_config()
    last = config["layers"][-1]
    if last["class_name"] != "Dense" or last["config"].get("activation") != "softmax":
        raise ValueError(f"{name} should end with a Dense layer with softmax, as notebook 01 builds it; "
                         f"it ends with {last['class_name']} ({last['config'].get('activation')}).")
    last["config"]["activation"] = "linear"
    logits_model = tf.keras.Sequential.from_config(config)
    logits_model.set_weights(trained.get_weights())
    return logits_model
