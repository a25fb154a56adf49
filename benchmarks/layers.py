"""Where a private prediction's time and traffic go, layer by layer (compute only, three local servers).

    .venv/bin/python benchmarks/layers.py [--output build/benchmark]

The servers' computation is cut after each of its steps (the network's own ``steps``, shortened for the
trace), and each cut is timed and its messages between the servers counted on its graph. A cut that ends
on a product truncates it with an opening of its own, as the logits are, so a row's cost is read as the
difference between two cuts, block by block: the clip; each convolution with its pooling and its ReLU;
the dense layer with the logits' truncation. The cuts take turns, round after round, so a slower minute
slows all of them alike. Writes layers.json to the output folder and prints a table.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
from tf_encrypted.protocol.pond.pond import PondPrivateTensor

from private_predictions import LocalCluster, connect, load_logits_model, load_mnist_test, share_model
from private_predictions._tf import tf
from private_predictions.traffic import crossings

REPO_ROOT = Path(__file__).resolve().parents[1]
ROUNDS = {1: 40, 64: 15}  # timed runs of every cut, per batch size
# Message hops each block adds on the critical path: the clip's comparison (three hops),
# a product's opening (one), a ReLU (three, its truncation read off its own opening), the logits'
# truncation (one).
HOPS = {"clip": 3, "block": 4, "dense": 2}


def cut(protocol, network, images, upto):
    """A traced function: the first ``upto`` steps on a fresh sharing of ``images`` (None: no network at all,
    the shares go in and come out), and the bytes its servers send each other."""
    steps = list(network.steps)

    @tf.function
    def run():
        share0 = tf.constant(np.random.default_rng().integers(-2**63, 2**63, images.shape, dtype=np.int64))
        shares = []
        for share, server in ((share0, protocol.server_0), (images - share0, protocol.server_1)):
            with tf.device(server.device_name):
                shares.append(protocol.tensor_factory.tensor(tf.identity(share)))
        x = PondPrivateTensor(protocol, *shares, True)
        if upto is None:
            return tuple(share.value for share in x.unwrapped)
        network.steps = steps[:upto]
        try:
            return tuple(share.value for share in network(x).unwrapped)
        finally:
            network.steps = steps

    graph = run.get_concrete_function().graph
    run()  # built before timing
    return run, sum(crossings(graph).values())


def blocks(network):
    """(name, hops, number of steps computed by the end of it), one per row of the table."""
    rows = [("clip the input to [0, 1]", HOPS["clip"], 0)]
    for number, (kind, _, _) in enumerate(network.steps, start=1):
        if kind == "ReLU":
            rows.append((f"block {len(rows)}: convolution, sum pooling, ReLU", HOPS["block"], number))
    rows.append(("dense, truncate the logits", HOPS["dense"], len(network.steps)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(REPO_ROOT / "build" / "benchmark"))
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    x_test, _ = load_mnist_test()
    results = {}
    with LocalCluster.start(config_path=output / "layers-cluster.json") as cluster:
        protocol = connect(cluster.config)
        model = share_model(load_logits_model(), protocol)
        network = model.network
        scale = protocol.fixedpoint_config.scaling_factor
        rows = blocks(network)
        for batch, rounds in ROUNDS.items():
            images = np.round(x_test[:batch] * scale).astype(np.int64)
            cuts = [cut(protocol, network, images, None)] + [cut(protocol, network, images, upto)
                                                               for _, _, upto in rows]
            seconds = [[] for _ in cuts]
            for _ in range(rounds):
                for run, taken in zip((run for run, _ in cuts), seconds):
                    start = time.perf_counter()
                    run()
                    taken.append(time.perf_counter() - start)
            medians = [float(np.median(taken)) * 1000 for taken in seconds]
            sent = [bytes_sent / batch for _, bytes_sent in cuts]
            results[batch] = [{"block": name, "hops": hops, "ms": medians[i + 1] - medians[i],
                               "bytes_per_image": sent[i + 1] - sent[i]}
                              for i, (name, hops, _) in enumerate(rows)]
            results[batch].append({"block": "whole network", "hops": sum(hops for _, hops, _ in rows),
                                   "ms": medians[-1] - medians[0], "bytes_per_image": sent[-1]})
        model.close()
    (output / "layers.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'':46} {'hops':>5} {'batch 1':>20} {'batch 64, per image':>26}")
    for one, sixty_four in zip(results[1], results[64]):
        print(f"{one['block']:46} {one['hops']:>5} {one['ms']:7.1f} ms {one['bytes_per_image'] / 1e3:6.0f} kB "
              f"{sixty_four['ms'] / 64:9.2f} ms {sixty_four['bytes_per_image'] / 1e3:6.0f} kB")
    print(f"\nwritten: {output / 'layers.json'}")


if __name__ == "__main__":
    main()
