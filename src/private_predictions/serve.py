"""Serve the trained model on a running cluster: ``python -m private_predictions.serve CONFIG``.

Used by the tests, and on the model owner's machine in a multi-host deployment.
"""
import argparse
import selectors
import subprocess
import sys
import threading
import time
from typing import List, NamedTuple, Sequence

from .cluster import RemoteCluster
from .model import load_logits_model
from .protocol import connect
from .serving import ServingConflictError, share_model
from .watch import ServerUnreachableError


def main(argv=None) -> None:
    """Serve the trained model on a running cluster."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("config", help="cluster configuration file naming the three servers")
    parser.add_argument("--requests", type=int, default=None, help="stop after this many (default: never)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait for each request (default: no limit)")
    args = parser.parse_args(argv)
    model = load_logits_model()
    protocol = connect(RemoteCluster.join(args.config, args.timeout or 3600.0).config)
    start = time.perf_counter()
    secure_model = share_model(model, protocol)
    shared_in = time.perf_counter() - start
    said = []

    def report(line: str) -> None:
        if not said:  # the first line comes once this side holds the serving lease
            print(f"{READY} (model shared in {shared_in:.2f} s)", flush=True)
        said.append(line)
        print(line, flush=True)

    try:
        secure_model.serve(args.requests, args.timeout, report=report)
    except (ServerUnreachableError, ServingConflictError) as error:
        sys.exit(f"{STOPPED}: {error}")
    except KeyboardInterrupt:
        sys.exit(f"{STOPPED}: interrupted")


READY = "serving"
STOPPED = "serving stopped"


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


def start_serving_process(config_path, timeout: float = 120.0,
                          launcher: Sequence[str] = ()) -> ServingProcess:
    """Run this module in a child process, sharing the model and serving it until stopped.

    Waits at most ``timeout`` s for the child to say it is serving, and kills it otherwise.
    ``launcher`` runs it elsewhere, as in :func:`private_predictions.cluster.start_player`.
    """
    process = subprocess.Popen([*launcher, sys.executable, "-m", __name__, str(config_path)],
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


if __name__ == "__main__":
    main()
