"""Reference points for the benchmark, measured on the same servers, interleaved with the series.

    python benchmarks/anchors.py stock-serve CONFIG          # tf-encrypted's own QueueServer, until killed
    python benchmarks/anchors.py ROLE CONFIG QUERIES         # ROLE: stock-query, compute-only, compute-only-aby3

A measuring role warms up, prints ``ready``, then runs one block of QUERIES timed calls for
each line it reads (``1``: batches of one image; ``32``: batches of 32, with the loopback
traffic of one more call) and prints the block's times as one JSON line. When its input
closes it prints what it measured once (peak memory, logit error) and exits. The benchmark
asks each path for its blocks in turn, so that a machine that slows down over the minutes
of a run slows every path alike.

* stock: ``tfe.serving.QueueServer``/``QueueClient`` with stock SecureNN and its default
  fixed point, batch 1, as tf-encrypted ships them (the client reveals the result on the servers,
  which the series never does; here it is only a yardstick for speed).
* compute-only: the series' protocol and encoding, input shared on server0, one traced
  function over the network, output revealed: the secure computation without any queue.
* compute-only-aby3: the same with ``tfe.protocol.ABY3()`` and its default fixed point, the
  other three-server protocol in tf-encrypted 0.9.1, so that the choice between the two is
  measured on the same servers in the same run.
"""
import json
import sys
import time

import numpy as np

WARM_UP = 5
SHAPE = (1, 28, 28, 1)


def peak_rss_bytes(pid="self") -> int:
    """The kernel's high-water mark of a process's resident memory (VmHWM)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def loopback_bytes() -> int:
    return int(open("/sys/class/net/lo/statistics/tx_bytes").read())


def seconds_of(function, queries):
    times = []
    for _ in range(queries):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def tfe_keras_model(protocol, keras_model):
    """``keras_model`` as tf-encrypted's own Keras layers over ``protocol``: what stock serving runs."""
    from private_predictions._tf import tfe

    config = keras_model.get_config()
    # tfe.keras builds its layers for a concrete batch size, then accepts any; it
    # skips Keras's InputLayer and reads the shape from the first real layer.
    layers = [layer for layer in config["layers"] if layer["class_name"] != "InputLayer"]
    layers[0]["config"]["batch_input_shape"] = (1,) + tuple(keras_model.input_shape[1:])
    private_model = tfe.keras.models.Sequential.from_config(config)
    private_model.set_weights(keras_model.get_weights())
    return private_model


def stock_protocol(config):
    from private_predictions._tf import tfe
    from private_predictions.protocol import tfe_config

    tfe.set_config(tfe_config(config))
    tfe.get_config().connect_servers()
    protocol = tfe.protocol.SecureNN()
    tfe.set_protocol(protocol)
    return protocol


def measuring_calls(role, config, x_test):
    """{"1": call, "32": call} for this role, and a function returning what it measures once."""
    from private_predictions import load_logits_model
    from private_predictions._tf import tf, tfe
    from private_predictions.protocol import connect
    from private_predictions.serving import secret_network

    if role == "stock-query":
        stock_protocol(config)
        client = tfe.serving.QueueClient(input_shape=SHAPE, output_shape=(1, 10))
        image = x_test[:1].astype(np.float64)
        return {"1": lambda: client.run(image)}, dict
    protocol = connect(config)
    keras_model = load_logits_model()
    if role == "compute-only-aby3":
        protocol = tfe.protocol.ABY3()
        tfe.set_protocol(protocol)
        model = tfe_keras_model(protocol, keras_model)
    else:
        model, _, divisor = secret_network(keras_model, protocol)
        assert divisor == 1, "the model does not fit this encoding as it is"

    @tf.function
    def compute(images):
        x = protocol.define_private_input("server0", lambda: images)
        return model(x).reveal().to_native()

    batches = {str(size): tf.constant(x_test[:size].astype(np.float64)) for size in (1, 32)}

    def once():
        plain = keras_model(x_test[:32]).numpy()
        return {"max_abs_logit_error_32_images": float(np.abs(compute(batches["32"]).numpy() - plain).max())}
    return {size: (lambda images=images: compute(images).numpy()) for size, images in batches.items()}, once


def main(argv):
    role, config_path = argv[0], argv[1]
    from private_predictions import load_logits_model, load_mnist_test
    from private_predictions._tf import tfe
    from private_predictions.config import ClusterConfig

    config = ClusterConfig.load(config_path)
    x_test, _ = load_mnist_test()
    if role == "stock-serve":
        protocol = stock_protocol(config)
        model = tfe_keras_model(protocol, load_logits_model())
        server = tfe.serving.QueueServer(input_shape=SHAPE, output_shape=(1, 10), computation_fn=model)
        print("serving", flush=True)
        server.run()
        return
    queries = int(argv[2])
    calls, once = measuring_calls(role, config, x_test)
    for call in calls.values():
        seconds_of(call, WARM_UP)
    print("ready", flush=True)
    for line in sys.stdin:
        call = calls[line.strip()]
        block = {"seconds": seconds_of(call, queries)}
        sent = loopback_bytes()
        call()
        block["loopback_bytes"] = loopback_bytes() - sent
        print(json.dumps(block), flush=True)
    print(json.dumps({**once(), "peak_rss_bytes": peak_rss_bytes()}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
