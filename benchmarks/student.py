"""One student of the benchmark's class: a process of its own that imports only the client (numpy, grpc).

    python benchmarks/student.py CARD IMAGES FIRST

Connects through the doors with its card, prints ``ready``, and waits for a line on its input, so
that the whole class starts at once. Then it asks, as the class test's students do, for the test
images FIRST to FIRST + 3 one at a time and FIRST + 4 to FIRST + 7 as one batch (IMAGES is a .npy
file of test images), and prints one JSON line: each query's seconds and all the logits, which the
benchmark checks against the plaintext model. It closes its client and ends only at the next line on
its input, once the whole class is timed: a student's exit (gRPC's shutdown, Python's) runs on its
own laptop in a classroom, not on the servers' cores.
"""
import json
import sys
import time

import numpy as np

from private_predictions.client import PrivateClient

SINGLES, BATCH = 4, 4


def main(argv):
    card, images, first = argv[0], np.load(argv[1]), int(argv[2])
    client = PrivateClient.connect(card, timeout=120, say=lambda line: None)
    print("ready", flush=True)
    sys.stdin.readline()
    queries = [images[first + number:first + number + 1] for number in range(SINGLES)]
    queries.append(images[first + SINGLES:first + SINGLES + BATCH])
    seconds, logits = [], []
    for query in queries:
        start = time.perf_counter()
        logits += client.predict_logits(query).tolist()
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"seconds": seconds, "logits": logits}), flush=True)
    sys.stdin.readline()
    client.close()


if __name__ == "__main__":
    main(sys.argv[1:])
