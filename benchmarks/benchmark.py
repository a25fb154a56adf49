"""Measure what a private prediction costs on this machine, with three local servers.

    .venv/bin/python benchmarks/benchmark.py [--output build/benchmark]

Prints a table and writes benchmark.json and benchmark.png to the output folder.
Every process it starts is stopped before it exits.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from private_predictions import LocalCluster, PrivateClient, load_logits_model, load_mnist_test
from private_predictions.client import Card
from private_predictions.dealing import pack_of
from private_predictions.tooling import start_serving_process
from private_predictions._tf import tf
from private_predictions.queues import MAX_BATCH_SIZE

REPO_ROOT = Path(__file__).resolve().parents[1]
BATCH_SIZES = (1, 8, 32, MAX_BATCH_SIZE)


sys.path.insert(0, str(Path(__file__).parent))
from anchors import loopback_bytes, peak_rss_bytes  # noqa: E402

ANCHORS = Path(__file__).parent / "anchors.py"
STUDENT = Path(__file__).parent / "student.py"
ROUNDS = 5  # batch-1 blocks per path, taken in turn
CLASS, EACH = 24, 8  # a class's students, and the images each asks for (4 alone, then 4 in one batch)


class Anchor:
    """One of anchors.py's measuring processes: it runs a block of timed calls when asked."""

    def __init__(self, role: str, config_path: Path, queries: int):
        self.process = subprocess.Popen([sys.executable, str(ANCHORS), role, str(config_path), str(queries)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True)
        self.seconds = {}
        self.loopback_bytes = {}
        if self.process.stdout.readline() != "ready\n":
            raise RuntimeError(f"anchors.py {role} did not start (exit code {self.process.wait(60)})")

    def block(self, batch: int) -> None:
        self.process.stdin.write(f"{batch}\n")
        self.process.stdin.flush()
        block = json.loads(self.process.stdout.readline())
        self.seconds.setdefault(batch, []).extend(block["seconds"])
        self.loopback_bytes[batch] = block["loopback_bytes"]

    def finish(self) -> dict:
        self.process.stdin.close()
        results = json.loads(self.process.stdout.readline())
        self.process.wait(60)
        for batch, seconds in self.seconds.items():
            results[f"batch{batch}_median_ms"] = percentile_ms(seconds, 50)
            results[f"batch{batch}_loopback_bytes_per_image"] = self.loopback_bytes[batch] / batch
        return results


def start_stock_serving(config_path: Path) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, str(ANCHORS), "stock-serve", str(config_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if not server.stdout.readline().startswith("serving"):
        raise RuntimeError(f"tf-encrypted's QueueServer did not start (exit code {server.wait(60)})")
    return server


def percentile_ms(seconds, q):
    return float(np.percentile(seconds, q) * 1000)


def time_calls(function, repeats, progress=None):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
        if progress is not None:
            progress.update(1)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(REPO_ROOT / "build" / "benchmark"))
    parser.add_argument("--latency-queries", type=int, default=100)
    parser.add_argument("--throughput-queries", type=int, default=10,
                        help="queries per batch size, times the lots dealt together for that size (dealing.py)")
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    x_test, y_test = load_mnist_test()
    plaintext_model = load_logits_model()
    plaintext_call = tf.function(lambda x: plaintext_model(x))
    results = {"machine": {"python": platform.python_version(), "tensorflow": tf.__version__,
                           "cpus": len(os.sched_getaffinity(0))}}

    with LocalCluster.start(config_path=output / "cluster.json") as cluster:
        print("starting tf-encrypted's own serving, the secure computation alone, and the series ...", flush=True)
        stock_server = start_stock_serving(cluster.config_path)
        serving, anchors = None, {}
        try:
            per_block = max(1, args.latency_queries // ROUNDS)
            anchors = {"stock_tfe_serving": Anchor("stock-query", cluster.config_path, per_block),
                       "compute_only": Anchor("compute-only", cluster.config_path, per_block),
                       "compute_only_aby3": Anchor("compute-only-aby3", cluster.config_path, per_block)}
            serving, results["secure_model_seconds"], _, _ = start_serving_process(cluster.config_path)
            # The series' client goes through the doors (TLS, numpy only), as every client does.
            card = cluster.admit("benchmark", output / "card.json", per_minute=None)
            client = PrivateClient.connect(card, timeout=60)
            steps = 2 * len(BATCH_SIZES) + 2 * per_block * ROUNDS
            steps += sum(args.throughput_queries * pack_of(batch) for batch in BATCH_SIZES)
            steps += -(-len(x_test) // MAX_BATCH_SIZE)
            with tqdm(total=steps, desc="benchmark", unit="query") as progress:
                for batch in BATCH_SIZES:  # trace each batch size once before timing
                    client.predict_logits(x_test[:batch])
                    plaintext_call(x_test[:batch])
                    progress.update(2)

                # The paths take turns, block by block: a slower minute slows all of them alike.
                one, private = x_test[:1], []
                for _ in range(ROUNDS):
                    private += time_calls(lambda: client.predict_logits(one), 2 * per_block, progress)
                    for path in anchors.values():
                        path.block(1)
                # What a client's first query pays for its TLS connections: a first greeting of both
                # doors from a new client, against a greeting over connections already made.
                first, again = [], []
                for _ in range(10):
                    fresh = PrivateClient(Card.load(card))
                    first += time_calls(fresh.hello, 1)
                    again += time_calls(fresh.hello, 5)
                    fresh.close()
                results["tls"] = {"first_hello_ms": percentile_ms(first, 50), "hello_ms": percentile_ms(again, 50)}
                for name in ("compute_only", "compute_only_aby3"):
                    anchors[name].block(32)
                for name, path in anchors.items():
                    results[name] = path.finish()
                results["stock_tfe_serving"]["serving_peak_rss_bytes"] = peak_rss_bytes(stock_server.pid)
                stock_server.kill()
                plaintext = time_calls(lambda: plaintext_call(one).numpy(), per_block * ROUNDS)
                results["batch1"] = {
                    "private_median_ms": percentile_ms(private, 50),
                    "private_p95_ms": percentile_ms(private, 95),
                    "plaintext_median_ms": percentile_ms(plaintext, 50),
                    "queries": len(private),
                }
                results["batch1"]["ratio"] = (results["batch1"]["private_median_ms"]
                                              / results["batch1"]["plaintext_median_ms"])
                results["ratios"] = {
                    "batch1_series_over_stock_tfe": (results["batch1"]["private_median_ms"]
                                                     / results["stock_tfe_serving"]["batch1_median_ms"]),
                    "batch1_end_to_end_over_compute_only": (results["batch1"]["private_median_ms"]
                                                            / results["compute_only"]["batch1_median_ms"]),
                    "batch1_end_to_end_minus_compute_only_ms": (results["batch1"]["private_median_ms"]
                                                                - results["compute_only"]["batch1_median_ms"]),
                }

                results["throughput"] = []
                for batch in BATCH_SIZES:
                    images = x_test[:batch]
                    sent_before, client_before = loopback_bytes(), client.bytes_sent + client.bytes_received
                    # Lots are dealt a pack at a time (dealing.py): as many queries as packs hold lots, so
                    # that the traffic counted includes each query's share of its pack's dealing.
                    queries = args.throughput_queries * pack_of(batch)
                    times = time_calls(lambda: client.predict_logits(images), queries, progress)
                    sent = loopback_bytes() - sent_before
                    by_client = client.bytes_sent + client.bytes_received - client_before
                    results["throughput"].append({
                        "batch": batch,
                        "images_per_second": batch * len(times) / sum(times),
                        "median_query_ms": percentile_ms(times, 50),
                        "loopback_bytes_per_image": sent / (batch * len(times)),
                        "client_bytes_per_image": by_client / (batch * len(times)),
                    })

                # The whole test set goes in batches of the size that gave the most images/s.
                best = max(results["throughput"], key=lambda row: row["images_per_second"])["batch"]
                progress.total += -(-len(x_test) // best) - -(-len(x_test) // MAX_BATCH_SIZE)
                start = time.perf_counter()
                logits = []
                for first in range(0, len(x_test), best):
                    logits.append(client.predict_logits(x_test[first:first + best]))
                    progress.update(1)
                seconds = time.perf_counter() - start
            private_logits = np.concatenate(logits)
            plain_logits = np.concatenate([plaintext_call(x_test[i:i + 1000]).numpy()
                                           for i in range(0, len(x_test), 1000)])
            results["test_set"] = {
                "images": len(x_test),
                "batch": best,
                "seconds": seconds,
                "private_accuracy": float((private_logits.argmax(1) == y_test).mean()),
                "plaintext_accuracy": float((plain_logits.argmax(1) == y_test).mean()),
                "argmax_agreement": float((private_logits.argmax(1) == plain_logits.argmax(1)).mean()),
                "max_abs_logit_error": float(np.abs(private_logits - plain_logits).max()),
            }
            print(f"a class of {CLASS} asking at once, then the same queries one at a time ...", flush=True)
            results["class"] = measure_class(cluster, client, x_test[:CLASS * EACH], plaintext_call, output)
            results["peak_rss_bytes"] = {name: peak_rss_bytes(pid) for name, pid in cluster.pids.items()}
            results["peak_rss_bytes"]["model owner (serving)"] = peak_rss_bytes(serving.pid)
            results["peak_rss_bytes"]["client"] = peak_rss_bytes(os.getpid())
        finally:
            for process in [stock_server, serving] + [path.process for path in anchors.values()]:
                if process is not None:
                    process.kill()
                    process.wait(10)

    (output / "benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, output / "benchmark.png")
    print(table(results))
    print(f"\nwritten: {output / 'benchmark.json'}, {output / 'benchmark.png'}")


def measure_class(cluster, client, images, plaintext, folder: Path) -> dict:
    """A class of CLASS students asking at once through the doors, each in a process of its own, and
    the same queries sent one at a time by one client.

    The students run at the lowest priority (nice 19): on this 2-core machine their own work (TLS,
    sharing, numpy) would otherwise take CPU from the servers being measured, where in a classroom it
    runs on the students' laptops. For the same reason they end only after the class is timed. Their
    memory is theirs too, and is not counted with the servers'.
    """
    np.save(folder / "class-images.npy", images)
    students, reports = [], []
    try:
        for number in range(CLASS):
            card = cluster.admit(f"student-{number + 1:02d}", folder / f"student-{number + 1:02d}.json",
                                 per_minute=None)
            students.append(subprocess.Popen(
                ["nice", "-n", "19", sys.executable, str(STUDENT), str(card), str(folder / "class-images.npy"),
                 str(EACH * number)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True))
        for student in students:
            if student.stdout.readline() != "ready\n":
                raise RuntimeError(f"a student did not connect: {student.communicate(timeout=60)[1][-2000:]}")
        start = time.perf_counter()
        for student in students:  # all at once: each is waiting on its input
            student.stdin.write("go\n")
            student.stdin.flush()
        for student in students:
            line = student.stdout.readline()
            if not line:
                raise RuntimeError(f"a student failed: {student.communicate(timeout=60)[1][-2000:]}")
            reports.append(json.loads(line))
        seconds = time.perf_counter() - start
        for student in students:  # the class is timed: now they may close their clients and end
            student.communicate("done\n", timeout=60)
    finally:
        for student in students:
            student.kill()
            student.wait(10)
        (folder / "class-images.npy").unlink()
    logits = np.array([row for report in reports for row in report["logits"]])
    expected = plaintext(images).numpy()
    waits = [wait for report in reports for wait in report["seconds"]]
    together = {"clients": CLASS, "images": len(images), "queries": len(waits), "seconds": seconds,
                "images_per_second": len(images) / seconds,
                "p50_ms": percentile_ms(waits, 50), "p95_ms": percentile_ms(waits, 95),
                "argmax_agreement": float((logits.argmax(1) == expected.argmax(1)).mean()),
                "max_abs_logit_error": float(np.abs(logits - expected).max())}
    alone = []
    start = time.perf_counter()
    for first in range(0, len(images), EACH):
        queries = [images[first + number:first + number + 1] for number in range(EACH // 2)]
        for query in queries + [images[first + EACH // 2:first + EACH]]:
            alone += time_calls(lambda: client.predict_logits(query), 1)
    seconds = time.perf_counter() - start
    together["one_at_a_time"] = {"clients": 1, "images": len(images), "queries": len(alone), "seconds": seconds,
                                 "images_per_second": len(images) / seconds,
                                 "p50_ms": percentile_ms(alone, 50), "p95_ms": percentile_ms(alone, 95)}
    return together


def table(results) -> str:
    b1, ts, ratios = results["batch1"], results["test_set"], results["ratios"]
    stock, compute = results["stock_tfe_serving"], results["compute_only"]
    b32 = next(row for row in results["throughput"] if row["batch"] == 32)
    lines = [
        f"batch 1, series / stock tf-encrypted serving: {ratios['batch1_series_over_stock_tfe']:.2f} "
        f"({b1['private_median_ms']:.1f} ms / {stock['batch1_median_ms']:.1f} ms, same servers, same run)",
        f"a new client's first greeting of both doors (TLS handshakes): {results['tls']['first_hello_ms']:.1f} ms; "
        f"a greeting over open connections: {results['tls']['hello_ms']:.1f} ms",
        f"batch 1, end to end / compute only: {ratios['batch1_end_to_end_over_compute_only']:.2f} "
        f"(+{ratios['batch1_end_to_end_minus_compute_only_ms']:.1f} ms over {compute['batch1_median_ms']:.1f} ms)",
        f"batch 32 per image, end to end / compute only: "
        f"{1000 / b32['images_per_second'] / (compute['batch32_median_ms'] / 32):.2f} "
        f"({1000 / b32['images_per_second']:.1f} ms / {compute['batch32_median_ms'] / 32:.1f} ms)",
        "",
        "the two protocols, compute only (batch 1 median; per image at batch 32; loopback traffic per image at "
        "batch 32; max logit error on 32 images):",
    ]
    for name, row in (("SecureNN (the series)", compute), ("ABY3", results["compute_only_aby3"])):
        lines.append(f"  {name:<22} {row['batch1_median_ms']:6.1f} ms {row['batch32_median_ms'] / 32:6.1f} ms "
                     f"{row['batch32_loopback_bytes_per_image'] / 1e6:6.2f} MB "
                     f"{row['max_abs_logit_error_32_images']:.4f}")
    lines += [
        "",
        f"batch-1 latency: private median {b1['private_median_ms']:.1f} ms, p95 {b1['private_p95_ms']:.1f} ms; "
        f"plaintext median {b1['plaintext_median_ms']:.2f} ms; ratio {b1['ratio']:.0f}x ({b1['queries']} queries)",
        f"time to secure the model (share its weights across the servers): {results['secure_model_seconds']:.2f} s",
        "",
        f"{'batch':>6} {'images/s':>10} {'query ms':>10} {'loopback bytes/image':>22} {'client bytes/image':>20}",
    ]
    for row in results["throughput"]:
        lines.append(f"{row['batch']:>6} {row['images_per_second']:>10.1f} {row['median_query_ms']:>10.1f} "
                     f"{row['loopback_bytes_per_image'] / 1e6:>19.2f} MB {row['client_bytes_per_image'] / 1e3:>17.1f} kB")
    lines += [
        "",
        f"test set ({ts['images']} images, batches of {ts['batch']}): {ts['seconds']:.1f} s; "
        f"accuracy private {ts['private_accuracy']:.2%} vs plaintext {ts['plaintext_accuracy']:.2%}; "
        f"argmax agreement {ts['argmax_agreement']:.2%}; max |logit error| {ts['max_abs_logit_error']:.4f}",
        f"a class of {results['class']['clients']} asking at once ({results['class']['queries']} queries, "
        f"{results['class']['images']} images): {results['class']['images_per_second']:.1f} images/s, a query "
        f"waits {results['class']['p50_ms']:.0f} ms (median), {results['class']['p95_ms']:.0f} ms (95th "
        f"percentile); the same queries one at a time: {results['class']['one_at_a_time']['images_per_second']:.1f} "
        f"images/s, {results['class']['one_at_a_time']['p50_ms']:.0f} ms (median), "
        f"{results['class']['one_at_a_time']['p95_ms']:.0f} ms (95th percentile); argmax agreement "
        f"{results['class']['argmax_agreement']:.2%}, max |logit error| {results['class']['max_abs_logit_error']:.4f}",
        "peak resident memory: " + ", ".join(f"{name} {rss / 2**30:.2f} GiB"
                                            for name, rss in results["peak_rss_bytes"].items()),
        f"all processes together: {sum(results['peak_rss_bytes'].values()) / 2**30:.2f} GiB "
        f"(the anchors' processes, ended before the throughput runs: stock serving "
        f"{stock['serving_peak_rss_bytes'] / 2**30:.2f} GiB, stock client {stock['peak_rss_bytes'] / 2**30:.2f} GiB, "
        f"compute only {compute['peak_rss_bytes'] / 2**30:.2f} GiB)",
    ]
    return "\n".join(lines)


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["throughput"]
    batches = [r["batch"] for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(batches, [r["median_query_ms"] for r in rows], "o-")
    left.set(xscale="log", yscale="log", xlabel="batch size", ylabel="median query time (ms)",
             title="Latency of one private query")
    right.plot(batches, [r["images_per_second"] for r in rows], "o-")
    right.set(xscale="log", xlabel="batch size", ylabel="images / s", title="Private throughput")
    for axis in (left, right):
        axis.set_xticks(batches)
        axis.set_xticklabels(batches)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
