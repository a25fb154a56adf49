"""A function XLA compiled for one process is never run for another (compiled.py)."""
import subprocess
import sys

# Two processes that trace the same steps give their functions the same counter; here the same name
# and shapes, different bodies.
STEP = """
import sys
from private_predictions import connect
from private_predictions._tf import tf
from private_predictions.compiled import compiled
from private_predictions.config import ClusterConfig

protocol = connect(ClusterConfig.load(sys.argv[1]))
ADD = int(sys.argv[2])


def step(x):
    return x * 3 + ADD


on_server = compiled(step)


@tf.function
def run(x):
    with tf.device(protocol.server_0.device_name):
        return on_server(x)


print(int(run(tf.constant(1)).numpy()))
"""


def test_two_processes_compiling_functions_of_one_name_each_get_their_own(cluster, tmp_path):
    # A server keeps XLA's compilations by name and shapes for every process: were the names the same, the
    # second process would run the first one's body, and get 4 where it computes 5.
    script = tmp_path / "step.py"
    script.write_text(STEP)
    for add in (1, 2):
        done = subprocess.run([sys.executable, str(script), str(cluster.config_path), str(add)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split() == [str(3 + add)]
