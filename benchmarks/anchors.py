"""Reference points for the benchmark, measured on the same servers in the same run.

    python benchmarks/anchors.py stock-serve CONFIG QUERIES     # tf-encrypted's own QueueServer
    python benchmarks/anchors.py stock-query CONFIG QUERIES     # its QueueClient; prints one JSON line
    python benchmarks/anchors.py compute-only CONFIG QUERIES    # the series' protocol, no queues
    python benchmarks/anchors.py compute-only-aby3 CONFIG QUERIES   # the other protocol, no queues

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


def peak_rss_bytes(pid="self") -> int:
    """The kernel's high-water mark of a process's resident memory (VmHWM)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def loopback_bytes() -> int:
    return int(open("/sys/class/net/lo/statistics/tx_bytes").read())


def median_ms(function, queries):
    for _ in range(WARM_UP):
        function()
    times = []
    for _ in range(queries):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def private_model_for(protocol, keras_model):
    from private_predictions.serving import private_keras_model

    private_model, _, divisor = private_keras_model(keras_model, protocol)
    assert divisor == 1, "the model does not fit this encoding as it is"
    return private_model


def main(argv):
    role, config_path, queries = argv[0], argv[1], int(argv[2])
    from private_predictions import load_logits_model, load_mnist
    from private_predictions._tf import tf, tfe
    from private_predictions.config import ClusterConfig
    from private_predictions.protocol import connect, tfe_config

    config = ClusterConfig.load(config_path)
    (_, _), (x_test, _) = load_mnist()
    shape = (1, 28, 28, 1)
    if role.startswith("stock"):
        tfe.set_config(tfe_config(config))
        tfe.get_config().connect_servers()
        protocol = tfe.protocol.SecureNN()
        tfe.set_protocol(protocol)
        if role == "stock-serve":
            model = private_model_for(protocol, load_logits_model())
            server = tfe.serving.QueueServer(input_shape=shape, output_shape=(1, 10), computation_fn=model)
            print("serving", flush=True)
            server.run(WARM_UP + queries)
            print(json.dumps({"peak_rss_bytes": peak_rss_bytes()}), flush=True)
        else:
            client = tfe.serving.QueueClient(input_shape=shape, output_shape=(1, 10))
            image = x_test[:1].astype(np.float64)
            print(json.dumps({"batch1_median_ms": median_ms(lambda: client.run(image), queries),
                              "peak_rss_bytes": peak_rss_bytes()}), flush=True)
        return
    protocol = connect(config)
    if role == "compute-only-aby3":
        protocol = tfe.protocol.ABY3()
        tfe.set_protocol(protocol)
    model = private_model_for(protocol, load_logits_model())
    results = {}
    for batch in (1, 32):
        @tf.function
        def compute(images):
            x = protocol.define_private_input("server0", lambda: images)
            return model(x).reveal().to_native()

        images = tf.constant(x_test[:batch].astype(np.float64))
        results[f"batch{batch}_median_ms"] = median_ms(lambda: compute(images).numpy(), queries)
        sent = loopback_bytes()
        compute(images).numpy()
        results[f"batch{batch}_loopback_bytes_per_image"] = (loopback_bytes() - sent) / batch
    plain = load_logits_model()(x_test[:32]).numpy()  # the images of the last batch measured
    results["max_abs_logit_error_32_images"] = float(np.abs(compute(images).numpy() - plain).max())
    results["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
