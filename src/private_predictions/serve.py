"""Serve the trained model on a running cluster: ``python -m private_predictions.serve CONFIG``.

Used by the tests, and on the model owner's machine in a multi-host deployment.
"""
import argparse
import time

from .config import ClusterConfig
from .model import load_logits_model
from .serving import connect, share_model


def main(argv=None) -> None:
    """Serve the trained model on a running cluster."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("config", help="cluster configuration file naming the three servers")
    parser.add_argument("--requests", type=int, default=None, help="stop after this many (default: never)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for each request")
    args = parser.parse_args(argv)
    model = load_logits_model()
    protocol = connect(ClusterConfig.load(args.config))
    start = time.perf_counter()
    secure_model = share_model(model, protocol)
    print(f"serving (model shared in {time.perf_counter() - start:.2f} s)", flush=True)
    if args.requests is None:
        while True:  # until interrupted: a quiet hour is no reason to stop
            try:
                secure_model.serve_one(args.timeout)
            except TimeoutError:
                continue
    else:
        secure_model.serve(args.requests, args.timeout, report=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
