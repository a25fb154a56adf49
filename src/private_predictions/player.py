"""One TF Encrypted server: ``python -m private_predictions.player CONFIG NAME``.

Started by :class:`private_predictions.cluster.LocalCluster`, or by hand on each
machine of a multi-host deployment.
"""
import argparse
import sys

from . import _tf  # noqa: F401  (refuses to start without secure randomness)
from .config import ClusterConfig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", help="cluster configuration file (JSON)")
    parser.add_argument("name", help="which server to run: server0, server1 or server2")
    parser.add_argument("--started-by", type=int, metavar="PID",
                        help="set by LocalCluster: lets a later start tell an abandoned server of ours")
    args = parser.parse_args(argv)
    config = ClusterConfig.load(args.config)
    if args.name not in config.hosts:
        sys.exit(f"{args.name!r} is not in {args.config}; choose one of {list(config.hosts)}")
    server = config.tfe_config().start_server(args.name, start=True)
    print(f"{args.name} listening on {config.hosts[args.name]}", flush=True)
    server.join()


if __name__ == "__main__":
    main()
