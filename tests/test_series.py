import json
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest

from private_predictions.data import DatasetError, load_mnist, load_mnist_test
from private_predictions.series import NOTEBOOK_DIR, NOTEBOOK_STAGES, execute_stage


def test_every_notebook_is_executed_by_the_tests():
    staged = [name for stages in NOTEBOOK_STAGES.values() for stage in stages for name in stage]
    assert sorted(staged) == sorted(str(p.relative_to(NOTEBOOK_DIR)) for p in Path(NOTEBOOK_DIR).rglob("*.ipynb")
                                    if ".ipynb_checkpoints" not in p.parts)
    assert len(set(staged)) == len(staged)


def test_mnist_is_the_canonical_set():
    (x_train, y_train), (x_test, y_test) = load_mnist()
    assert x_train.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
    assert list(y_test[:10]) == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert 0.0 <= x_train.min() and x_train.max() == 1.0


def test_the_test_set_alone_is_the_same_and_leaves_the_training_images_unread():
    (_, _), (x_test, y_test) = load_mnist()
    x_alone, y_alone = load_mnist_test()
    assert np.array_equal(x_alone, x_test) and np.array_equal(y_alone, y_test)
    # The training images take 47 MB as read and 188 MB as the model's floats: a process that loads the
    # test set alone (a client, the benchmark) never holds them, even for a moment.
    grew = subprocess.run([sys.executable, "-c", MEMORY_GROWTH], capture_output=True, text=True, check=True)
    assert int(grew.stdout) < 100 * 2**20, grew.stdout


MEMORY_GROWTH = """
import re
def peak():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
from private_predictions.data import load_mnist_test
before = peak()
load_mnist_test()
print(peak() - before)
"""


@pytest.mark.parametrize("load", [load_mnist, load_mnist_test])
def test_damaged_mnist_is_refused(tmp_path, load):
    damaged = tmp_path / "mnist.npz"
    damaged.write_bytes(b"not mnist")
    try:
        load(damaged)
    except DatasetError as error:
        assert "SHA-256" in str(error)
    else:
        raise AssertionError("a damaged file was accepted")


def test_committed_notebooks_are_fit_to_publish():
    for path in sorted(p for p in Path(NOTEBOOK_DIR).rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts):
        text = path.read_text()
        notebook = json.loads(text)
        assert notebook["metadata"]["kernelspec"]["name"] == "python3", path.name
        assert all(cell["execution_count"] for cell in notebook["cells"] if cell["cell_type"] == "code"), \
            f"{path.name}: a code cell was not executed; run `python -m private_predictions.series notebooks`"
        # Readers see the notebook as committed: no run's timestamps, no one's home or work folders.
        assert not re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d", text), f"{path.name} has timestamps"
        assert not re.search(r"/(home|root|work|tmp|Users)/", text), f"{path.name} has a local path"


def test_the_summary_keeps_a_line_printed_in_pieces(tmp_path):
    import nbformat

    from private_predictions.series import SUMMARY_MARKERS, stdout_containing

    notebook = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print(...)")
    # As a kernel sent it on a fresh clone: the verdict came after the words, in an output of its own.
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="same predicted digits as the plaintext model:"),
                    nbformat.v4.new_output("stream", name="stdout", text=" True\nsomething else\n")]
    notebook.cells.append(cell)
    path = tmp_path / "n.ipynb"
    nbformat.write(notebook, path)
    assert stdout_containing(path, SUMMARY_MARKERS) == "same predicted digits as the plaintext model: True\n"


def test_a_failing_notebook_ends_its_stage_at_once(tmp_path):
    # As 02 would serve on after 03 failed, until its cell's timeout (10 minutes), and nobody said why.
    waits, fails = tmp_path / "serves.ipynb", tmp_path / "asks.ipynb"
    for path, code in ((waits, "import time\ntime.sleep(300)"), (fails, "raise RuntimeError('the client failed')")):
        nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)]), path)
    start = time.monotonic()
    with pytest.raises(Exception, match="the client failed"):
        execute_stage([str(waits), str(fails)], tmp_path / "out")
    assert time.monotonic() - start < 60


def test_the_serving_notebook_is_interrupted_once_the_others_are_done(tmp_path):
    # As a learner ends 02's last cell (■) once 03 is done: without it, the stage would wait 300 s.
    serves, asks, ready = tmp_path / "serves.ipynb", tmp_path / "asks.ipynb", tmp_path / "serving"
    serving = (f"import pathlib, time\ntry:\n    pathlib.Path({str(ready)!r}).touch()\n    time.sleep(300)\n"
               "except KeyboardInterrupt:\n    print('stopped: interrupted')")
    asking = f"import os, time\nwhile not os.path.exists({str(ready)!r}):\n    time.sleep(0.1)"  # as 03 waits for 02
    for path, code in ((serves, serving), (asks, asking)):
        nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)]), path)
    start = time.monotonic()
    served, asked = execute_stage([str(serves), str(asks)], tmp_path / "out")
    assert time.monotonic() - start < 60
    assert nbformat.read(served, as_version=4).cells[0].outputs[0]["text"] == "stopped: interrupted\n"
