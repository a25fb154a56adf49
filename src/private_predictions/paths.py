"""Where the repository keeps its data, models and cluster configuration."""
import os
from pathlib import Path

# The package is installed in editable mode from src/, so the repository root is two
# levels up; PRIVATE_PREDICTIONS_HOME lets a copied checkout point elsewhere.
REPO_ROOT = Path(
    os.environ.get("PRIVATE_PREDICTIONS_HOME", Path(__file__).resolve().parents[2])
)
DATA_DIR = REPO_ROOT / "data"
MODELS_DIR = REPO_ROOT / "models"
MODEL_PATH = MODELS_DIR / "short-conv-mnist.h5"
# What the plaintext model says about the first 100 test images (logits): published by the model
# owner (notebook 01), so that a client without TensorFlow can check its private predictions.
CHECK_LOGITS_PATH = MODELS_DIR / "short-conv-mnist.check-logits.npy"
CLUSTER_CONFIG_PATH = REPO_ROOT / "cluster.json"
CARD_PATH = REPO_ROOT / "card.json"  # the one-machine client's card, written by notebook 02


def shown(path) -> str:
    """``path`` as a reader of the notebooks would name it: relative to the repository if inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO_ROOT.resolve()))
    except ValueError:
        return str(path)
