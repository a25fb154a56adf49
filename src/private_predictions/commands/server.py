"""One TF Encrypted server: ``python -m private_predictions.commands.server CONFIG NAME``.

Started by :class:`private_predictions.cluster.LocalCluster`, or by hand on each
machine of a multi-host deployment.
"""
import argparse
import contextlib
import io
import sys
from pathlib import Path
from typing import List, Optional

import listen_guard

SERVER_MODULE = "private_predictions.commands.server"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {SERVER_MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="cluster configuration file (JSON)")
    parser.add_argument("name", help="which server to run: server0, server1 or server2")
    # Set by LocalCluster, so that a later start can tell an abandoned server of its own.
    parser.add_argument("--started-by", type=int, metavar="PID", help=argparse.SUPPRESS)
    parser.add_argument("--cluster-file", metavar="PATH", help=argparse.SUPPRESS)
    return parser


def command(config_path, name: str, python: str = sys.executable, started_by: Optional[int] = None,
            cluster_file=None) -> List[str]:
    arguments = [python, "-m", SERVER_MODULE, str(config_path), name]
    if started_by is not None:
        arguments += ["--started-by", str(started_by), "--cluster-file", str(cluster_file)]
    return arguments


def parse_command(arguments: List[str]) -> Optional[argparse.Namespace]:
    """What a process running this module was told, or None if ``arguments`` do not run it."""
    try:
        start = arguments.index("-m")
    except ValueError:
        return None
    if arguments[start + 1:start + 2] != [SERVER_MODULE]:
        return None
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse's complaint is not ours to print
            return parser().parse_args(arguments[start + 2:])
    except SystemExit:
        return None


def main(argv=None):
    args = parser().parse_args(argv)
    from .. import _tf  # noqa: F401  (refuses to start without secure randomness)
    from ..config import ClusterConfig
    from ..protocol import tfe_config

    config = ClusterConfig.load(args.config)
    if args.name not in config.hosts:
        sys.exit(f"{args.name!r} is not in {args.config}; choose one of {list(config.hosts)}")
    host, port = config.address(args.name)
    try:
        address = listen_guard.listen_only(port, host, args.name)
    except listen_guard.ListenGuardError as error:
        sys.exit(str(error))
    server = tfe_config(config).start_server(args.name, start=True)
    listen_guard.check_listening(port, address, args.name)
    print(f"{args.name} listening on {config.hosts[args.name]} only", flush=True)
    if args.name in config.doors:
        from ..admission import certificate_path
        from ..door import Door

        try:
            door = Door(config, args.config, args.name, server.target).start()
        except OSError as error:
            sys.exit(str(error))
        print(f"{args.name}'s door listening on {config.doors[args.name]} (TLS); its certificate is "
              f"{certificate_path(Path(args.config).parent, args.name)}, SHA-256 {door.fingerprint}", flush=True)
    server.join()


if __name__ == "__main__":
    main()
