"""Nothing a process of the series leaves behind stays: not on disk, not in the servers' memory."""
import os
import signal
import subprocess
import sys

TRACES_AND_IS_KILLED = """
import os, signal
from private_predictions._tf import tf

@tf.function
def converted(x):  # autograph converts this function: Python's if becomes a graph condition
    if x > 0:
        return x * 2
    return x

print(int(converted(tf.constant(3))), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # as nbval ends a kernel, or a test a serving process
"""


def test_a_process_that_traces_and_is_killed_leaves_no_autograph_file(tmp_path):
    script = tmp_path / "traces.py"  # autograph needs the function's source in a file
    script.write_text(TRACES_AND_IS_KILLED)
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    done = subprocess.run([sys.executable, str(script)], env=dict(os.environ, TMPDIR=str(temporary)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL and done.stdout == "6\n", done.stderr[-2000:]
    assert list(temporary.iterdir()) == []


CONVERTS_WITHOUT_A_FILE = """
import tempfile
def refused(*args, **kwargs):
    raise OSError("no file may be written in the temporary folder")
tempfile.NamedTemporaryFile = tempfile.mkstemp = refused  # what autograph's own loader writes with
from private_predictions._tf import tf

@tf.function
def converted(x):
    if x > 0:
        return x * 2
    return x

print(int(converted(tf.constant(3))), flush=True)
"""


def test_autograph_converts_without_writing_a_file_so_no_kill_can_leave_one(tmp_path):
    # Removing the file after loading it left one when a process was killed between the two (seen once in
    # a CI run): converting must write none at all.
    script = tmp_path / "converts.py"
    script.write_text(CONVERTS_WITHOUT_A_FILE)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "6\n", done.stderr[-2000:]


def test_setting_up_the_clients_kernel_leaves_nothing_in_the_temporary_folder(tmp_path):
    # scripts/setup-client.sh runs for every test run and every `make lab`; ipykernel's install stages the
    # kernel's files in a folder of its own under TMPDIR and never removes it (an empty tmp*_kernels each time).
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    done = subprocess.run(["bash", "scripts/setup-client.sh"], cwd=repository, capture_output=True, text=True,
                          env=dict(os.environ, TMPDIR=str(temporary)), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(temporary.iterdir()) == []
