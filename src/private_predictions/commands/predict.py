"""Ask the served model about MNIST test images: ``python -m private_predictions.commands.predict CARD``.

A client, through the doors (client.py): it needs numpy and grpc, not TensorFlow. Prints
one JSON object a line: index, label, private prediction and private logits. Used by the
tests to run many clients at once, and as a client on another machine.
"""
import argparse
import json
import sys

from ..client import PrivateClient
from ..data import load_mnist_test


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("card", help="your card from the model owner (notebook 02 writes card.json)")
    parser.add_argument("--first", type=int, default=0, help="index of the first test image")
    parser.add_argument("--count", type=int, default=5, help="how many images, one query each")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    x_test, y_test = load_mnist_test()
    client = PrivateClient.connect(args.card, timeout=args.timeout, say=lambda line: print(line, file=sys.stderr))
    for index in range(args.first, args.first + args.count):
        logits = client.predict_logits(x_test[index:index + 1], timeout=args.timeout)[0]
        print(json.dumps({"index": index, "label": int(y_test[index]),
                          "prediction": int(logits.argmax()), "logits": logits.tolist()}), flush=True)
    client.close()


if __name__ == "__main__":
    main()
