"""Serve the trained model on a running cluster: ``python -m private_predictions.commands.serve CONFIG``.

For the model owner's machine in a multi-host deployment (and the tests).
"""
import argparse
import sys
import time

from ..cluster import RemoteCluster
from ..model import load_logits_model
from ..protocol import connect
from ..serving import ServingConflictError, share_model
from ..watch import ServerUnreachableError


def main(argv=None) -> None:
    """Serve the trained model on a running cluster."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("config", help="cluster configuration file naming the three servers")
    parser.add_argument("--requests", type=int, default=None, help="stop after this many (default: never)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for each request (default: no limit)")
    parser.add_argument("--until-done", action="store_true",
                        help="also stop when a client says it is done (a model served for one client)")
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
        served = secure_model.serve(args.requests, args.timeout, report=report, until_done=args.until_done)
    except (ServerUnreachableError, ServingConflictError) as error:
        sys.exit(f"{STOPPED}: {error}")
    except KeyboardInterrupt:  # before serving began
        sys.exit(f"{STOPPED}: interrupted")
    if served.interrupted:
        sys.exit(f"{STOPPED}: interrupted")


READY = "serving"
STOPPED = "serving stopped"


if __name__ == "__main__":
    main()
