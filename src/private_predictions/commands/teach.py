"""Teach with it: you serve, the class asks. ``python -m private_predictions.commands.teach --students 24``.

Starts the three servers on this machine (their runtime on loopback only), with the doors of
server0 and server1 on this machine's address in the class's network; secret-shares the
trained model and serves it until you press Ctrl-C. It writes one card per student into the
folder (``class/`` by default): give each student theirs. A student needs only the client
install (``requirements-client.txt``) and the card, saved as ``card.json`` at the top of
their copy of the repository; then notebook 03 runs as it is.

From another terminal, while it serves:
  ``--admit NAME``   a card for a latecomer;     ``--revoke NAME``   that card stops working.
"""
import argparse
import os
import signal
import sys
from pathlib import Path

from ..admission import DEFAULT_PER_MINUTE, certificate_path, revoke, write_card
from ..client import Card
from ..config import ClusterConfig
from ..paths import REPO_ROOT, shown
from ..ports import address_towards

SERVERS_LINK = "servers"  # in the folder: a link to the running servers' own folder (admissions, certificates)


def class_address() -> str:
    """This machine's address on its default route (the class's Wi-Fi, mostly); loopback without one."""
    try:
        return address_towards("192.0.2.1", 9)  # a documentation address: nothing is sent
    except OSError:
        return "127.0.0.1"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m private_predictions.commands.teach",
                                     description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--students", type=int, default=24, help="how many cards to write (default 24)")
    parser.add_argument("--names", type=Path, help="a text file with one student name a line, instead of numbers")
    parser.add_argument("--address", help="where the class reaches the doors (default: this machine's "
                        "address on its default route)")
    parser.add_argument("--base-port", type=int, help="ports PORT to PORT+4 (servers, then doors; default: free "
                        "ones); the class must reach PORT+3 and PORT+4")
    parser.add_argument("--per-minute", type=int, default=DEFAULT_PER_MINUTE, help="images a student may send a "
                        f"minute (default {DEFAULT_PER_MINUTE})")
    parser.add_argument("--folder", type=Path, default=REPO_ROOT / "class", help="where the cards go")
    parser.add_argument("--admit", metavar="NAME", help="while serving: write a card for NAME")
    parser.add_argument("--revoke", metavar="NAME", help="while serving: revoke NAME's card")
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    folder = args.folder.resolve()
    if args.admit or args.revoke:
        servers = folder / SERVERS_LINK
        if not servers.exists():
            sys.exit(f"No class is being served from {shown(folder)}: start one first (without --admit/--revoke).")
        servers = servers.resolve()
        if args.admit:
            card = folder / f"{args.admit}.json"
            write_card(ClusterConfig.load(servers / "cluster.json"), servers, args.admit, card, args.per_minute)
            print(f"card for {args.admit!r}: {shown(card)}")
        if args.revoke:
            print(f"revoked {revoke(servers, args.revoke)} card(s) of {args.revoke!r}; its next query is refused")
        return
    names = ([line.strip() for line in args.names.read_text().splitlines() if line.strip()] if args.names
             else [f"student-{number:02d}" for number in range(1, args.students + 1)])
    # Stopped by `kill` (or a service manager) as by Ctrl-C: the servers stop and their folder goes.
    signal.signal(signal.SIGTERM, _interrupt)
    serve_class(names, folder, args.address or class_address(), args.base_port, args.per_minute)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve_class(names, folder: Path, address: str, base_port, per_minute) -> None:
    from ..certificates import fingerprint
    from ..cluster import LocalCluster
    from ..model import load_logits_model
    from ..protocol import connect
    from ..serving import share_model

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.json"):  # cards of an earlier class open nothing now: no confusion
        try:
            Card.load(old)
        except (ValueError, KeyError, TypeError):
            continue  # not a card: not ours to delete
        old.unlink()
    with LocalCluster.start(base_port, config_path=folder / "cluster.json", door_host=address) as cluster:
        link = folder / SERVERS_LINK
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(cluster.folder, link)
        try:
            secure_model = share_model(load_logits_model(), connect(cluster.config))
            cards = [cluster.admit(name, folder / f"{name}.json", per_minute) for name in names]
            print(f"{len(cards)} cards in {shown(folder)}/ ({shown(cards[0])} ...): give each student theirs.")
            for server, door in sorted(cluster.config.doors.items()):
                certificate = certificate_path(cluster.folder, server).read_bytes()
                print(f"{server}'s door: {door}   certificate SHA-256 {fingerprint(certificate)}")
            print("Students: pip install -r requirements-client.txt, save the card as card.json at the top of "
                  "the repository, run notebook 03.\nPress Ctrl-C to stop serving (the cards then open nothing).",
                  flush=True)
            try:  # Ctrl-C ends serve() itself, which says so
                secure_model.serve(None, timeout=None, report=lambda line: print(line, flush=True))
            except KeyboardInterrupt:  # SIGTERM (kill, a service manager), or Ctrl-C before serving began
                print("Stopped serving.")
            secure_model.close()
        finally:
            link.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
