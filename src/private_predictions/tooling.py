"""Tools for the tests and the benchmark: the serve command as a child process, watched."""
import selectors
import subprocess
import sys
import threading
import time
from typing import List, NamedTuple, Sequence

from .commands.serve import READY

SERVE_MODULE = "private_predictions.commands.serve"


class ServingProcess(NamedTuple):
    process: subprocess.Popen
    share_seconds: float  # how long securing the model took
    output: List[str]  # what it has printed so far, kept up to date
    reader: threading.Thread

    def wait(self, timeout: float) -> int:
        """Wait until it has exited and all it printed is in ``output``; return its exit code."""
        code = self.process.wait(timeout)
        self.reader.join(timeout)
        return code

    def stop(self) -> None:
        self.process.kill()
        self.wait(10)


def start_serving_process(config_path, timeout: float = 120.0, launcher: Sequence[str] = (),
                          options: Sequence[str] = ()) -> ServingProcess:
    """Run the serve command in a child process, sharing the model and serving it until stopped.

    Waits at most ``timeout`` s for the child to say it is serving, and kills it otherwise.
    ``launcher`` runs it elsewhere, as in :func:`private_predictions.cluster.start_server`;
    ``options`` are the command's own (``--until-done``, ...).
    """
    process = subprocess.Popen([*launcher, sys.executable, "-m", SERVE_MODULE, str(config_path), *options],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, seen = time.monotonic() + timeout, []
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                continue
            line = process.stdout.readline()
            if not line:
                break
            seen.append(line)
            if line.startswith(READY):
                # Keep reading its output, so the child can never block on a full pipe.
                reader = threading.Thread(target=_keep_reading, args=(process.stdout, seen), daemon=True)
                reader.start()
                return ServingProcess(process, float(line.split("model shared in ")[1].split()[0]), seen, reader)
    process.kill()
    process.wait(10)
    raise RuntimeError(f"the serving process did not start within {timeout:.0f} s; "
                       f"its output was:\n{''.join(seen)}")


def _keep_reading(stream, lines: List[str]) -> None:
    for line in stream:
        lines.append(line)


