"""Nobody on the network gets in: every TensorFlow server of the series listens only where its cluster file says.

TensorFlow 2.9 listens on every interface, unauthenticated; the series' listen guard
(src/listen_guard) puts each server on its own address. These tests look at the sockets
themselves, and try the way in that a stranger on the same Wi-Fi would.
"""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Optional

import psutil
import pytest

import listen_guard
from private_predictions.config import SERVER_NAMES
from private_predictions.ports import free_ports
from private_predictions.waiting import wait_until

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def listening(pids):
    """{(pid, port): address} of every listening TCP socket of these processes."""
    found = {}
    for pid in pids:
        for connection in psutil.Process(pid).net_connections(kind="tcp"):
            if connection.status == psutil.CONN_LISTEN:
                found[(pid, connection.laddr.port)] = connection.laddr.ip
    return found


LISTING = """
import json, sys, psutil
found = []
for pid in json.loads(sys.argv[1]):
    found += [[pid, c.laddr.port, c.laddr.ip] for c in psutil.Process(pid).net_connections("tcp") if c.status == "LISTEN"]
print(json.dumps(found))
"""


def listening_on_host(network, host, pids):
    """:func:`listening`, seen from inside ``host``'s namespace (sockets belong to a namespace)."""
    output = subprocess.run([*network.launcher(host), sys.executable, "-c", LISTING, json.dumps(list(pids))],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    return {(pid, port): address for pid, port, address in json.loads(output)}


def family(pid):
    process = psutil.Process(pid)
    return [process.pid] + [child.pid for child in process.children(recursive=True)]


BIND = """
import json, socket, sys
import listen_guard
guarded, other = int(sys.argv[1]), int(sys.argv[2])
listen_guard.listen_only(guarded, "localhost", "a test server")
names = []
for port in (guarded, other):
    server = socket.socket(socket.AF_INET6)
    server.bind(("::", port))  # what gRPC does with TensorFlow's "0.0.0.0:PORT"
    names.append(server.getsockname()[0])
print(json.dumps(names))
"""


def test_the_guard_moves_a_wildcard_bind_of_a_registered_port_to_its_address_and_no_other():
    guarded, other = free_ports(2)
    result = subprocess.run([sys.executable, "-c", BIND, str(guarded), str(other)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["::ffff:127.0.0.1", "::"]


def test_every_python_of_the_environment_starts_with_the_guard_in_effect():
    # However it is started: this is what a Jupyter kernel, VS Code or a command gets.
    check = "import listen_guard, os; print(listen_guard.in_effect(), os.getpid())"
    process = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "LD_LIBRARY_PATH")})
    assert process.stdout.split()[0] == "True", process.stderr


WITHOUT_GUARD = """
import sys
from private_predictions import ClusterError, connect
from private_predictions.config import ClusterConfig
import psutil
try:
    connect(ClusterConfig.load(sys.argv[1]))
    print("connected")
except Exception as error:
    print(type(error).__name__, error)
print("listening:", [c.laddr for c in psutil.Process().net_connections("tcp") if c.status == "LISTEN"])
"""


def test_a_process_without_the_guard_refuses_to_start_a_tensorflow_server(cluster):
    # -S: no site-packages .pth files, so nothing preloads the guard (as in a foreign Jupyter's kernel).
    paths = [str(Path(listen_guard.__file__).parents[1]), sysconfig.get_paths()["purelib"]]
    environment = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "LD_LIBRARY_PATH")}
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    result = subprocess.run([sys.executable, "-S", "-c", WITHOUT_GUARD, str(cluster.config_path)],
                            capture_output=True, text=True, timeout=120, env=environment)
    assert "ListenGuardError Refusing to start this process's TensorFlow server" in result.stdout, result.stderr[-2000:]
    assert "every network interface" in result.stdout and "restart the kernel" in result.stdout
    assert "listening: []" in result.stdout


def test_every_process_of_a_serving_cluster_listens_on_loopback_only(cluster, serving, client):
    processes = {"this test (a client)": os.getpid(), "the serving process": serving.process.pid,
                 **{name: process.pid for name, process in cluster.processes.items()}}
    sockets = listening(processes.values())
    for what, pid in processes.items():
        assert any(owner == pid for owner, _ in sockets), f"{what} listens nowhere: the check would be empty"
    assert set(sockets.values()) <= LOOPBACK, sockets


# The learner: a cluster, its serving process and a client querying in a loop, until stdin closes.
LEARNER = """
import json, sys, threading
from pathlib import Path
from private_predictions import LocalCluster, PrivateClient, load_mnist
from private_predictions.tooling import start_serving_process
(_, _), (x_test, _) = load_mnist()
cluster = LocalCluster.start(config_path=sys.argv[1])
serving = start_serving_process(cluster.config_path)
card = cluster.admit("learner", Path(sys.argv[1]).parent / "card.json")
client = PrivateClient.connect(card, timeout=60, say=lambda line: None)
client.predict_logits(x_test[:1])
stop = threading.Event()
answered = []
def ask():
    while not stop.is_set():
        answered.append(int(client.predict_logits(x_test[:1]).argmax()))
asking = threading.Thread(target=ask)
asking.start()
print(json.dumps({"servers": cluster.pids}), flush=True)
sys.stdin.readline()
stop.set()
asking.join(60)
serving.stop()
cluster.stop()
print(json.dumps({"answered": len(answered)}), flush=True)
"""

# The stranger, as in the issue: TCP to every port, then TensorFlow: join server0 and read a file there.
KNOCK = """
import json, socket, sys
reached = []
for port in json.loads(sys.argv[2]):
    try:
        socket.create_connection((sys.argv[1], port), timeout=2).close()
        reached.append(port)
    except OSError:
        pass
print(json.dumps(reached))
"""
READ_A_FILE = """
import sys
import tensorflow as tf
address, secret = sys.argv[1], sys.argv[2]
tf.config.experimental_connect_to_cluster(
    tf.train.ClusterSpec({"victim": [address], "stranger": ["localhost:4999"]}), job_name="stranger")
with tf.device("/job:victim/replica:0/task:0/device:CPU:0"):
    print("read:", tf.io.read_file(secret).numpy().decode(), flush=True)
"""


def attempt(network, host, script, *arguments, seconds):
    """Run ``script`` on ``host``; what it printed within ``seconds`` (TensorFlow retries a refused port forever)."""
    try:
        return subprocess.run([*network.launcher(host), sys.executable, "-c", script, *arguments],
                              capture_output=True, text=True, timeout=seconds).stdout
    except subprocess.TimeoutExpired as stopped:
        return stopped.stdout.decode() if isinstance(stopped.stdout, bytes) else (stopped.stdout or "")


def test_a_stranger_on_the_same_network_reaches_no_port_of_a_learners_series(tmp_path):
    from netns import NamespacesUnavailable, VirtualNetwork

    try:
        network = VirtualNetwork.create(("learner", "stranger"))
    except NamespacesUnavailable as reason:
        pytest.skip(f"no network namespaces here: {reason}")
    secret = tmp_path / "diary.txt"
    secret.write_text("the learner's own file")
    learner = subprocess.Popen([*network.launcher("learner"), sys.executable, "-c", LEARNER,
                                str(tmp_path / "cluster.json")],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        started = json.loads(learner.stdout.readline())
        sockets = listening_on_host(network, "learner", family(learner.pid))
        ports = sorted({port for _, port in sockets})
        server0 = [port for (pid, port) in sockets if pid == started["servers"]["server0"]]
        assert server0, sockets
        # Three servers (two with their doors) and the serving process listen, all on loopback; the
        # client, which goes through the doors, listens nowhere.
        assert len({pid for pid, _ in sockets} & set(family(learner.pid))) == 4, sockets
        assert len(sockets) == 6, sockets
        assert set(sockets.values()) <= LOOPBACK, sockets

        address = network.addresses["learner"]
        reached = attempt(network, "stranger", KNOCK, address, json.dumps(ports), seconds=60)
        assert json.loads(reached) == [], f"a stranger opened connections to ports {reached}"
        assert "read:" not in attempt(network, "stranger", READ_A_FILE, f"{address}:{server0[0]}", str(secret),
                                      seconds=20)
    finally:
        learner.stdin.close()
        try:
            learner.wait(90)
        finally:
            learner.kill()
            network.remove()
    assert json.loads(learner.stdout.readline())["answered"] > 0  # the client was querying all along


def test_servers_on_several_hosts_each_listen_on_their_own_address_only(network, servers_on_hosts):
    config_path = str(servers_on_hosts)
    servers = {}
    for process in psutil.process_iter(["cmdline"]):
        arguments = process.info["cmdline"] or []
        if config_path in arguments and arguments[-1] in SERVER_NAMES:
            servers[arguments[-1]] = process.pid
    assert sorted(servers) == list(SERVER_NAMES)
    for name, pid in servers.items():
        sockets = lambda: listening_on_host(network, name, [pid])
        wait_until(sockets, 60, f"{name} did not start listening")  # the fixture has just started it
        assert set(sockets().values()) == {f"::ffff:{network.addresses[name]}"}, name


def kernel_of(lab: subprocess.Popen) -> Optional[psutil.Process]:
    """JupyterLab's kernel process, or None while it has none."""
    for child in psutil.Process(lab.pid).children(recursive=True):
        try:
            if "ipykernel_launcher" in " ".join(child.cmdline()):
                return child
        except psutil.Error:  # a child that has just ended (a zombie until it is reaped) is no kernel
            continue
    return None


@pytest.mark.parametrize("runtime_folder", ["usual", "too deep for a Unix socket"])
def test_make_labs_kernels_talk_over_unix_sockets_and_start_wherever_the_runtime_folder_is(runtime_folder):
    # `make lab` runs scripts/lab.sh. Its kernels' five channels are Unix sockets in the runtime folder, not
    # TCP ports, and no "Kernel is running over TCP without encryption" alarms a privacy course's terminal.
    # (ipykernel keeps one loopback port for its forked children's output, and drops what lacks its random
    # key.) A socket's path holds 107 bytes at most: under a deeper folder the kernel still starts, on TCP
    # on loopback, where forcing Unix sockets left JupyterLab without a kernel.
    import shutil
    import tempfile
    import urllib.request

    repository = Path(__file__).resolve().parents[1]
    base = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # pytest's own folders are already too deep
    runtime, log, port = base / ("r" if runtime_folder == "usual" else "deep" * 20), base / "lab.log", free_ports(1)[0]
    with open(log, "wb") as output:
        lab = subprocess.Popen(["scripts/lab.sh", "--no-browser", f"--port={port}", "--ServerApp.token=test"],
                               cwd=repository, stdout=output, stderr=subprocess.STDOUT,
                               env=dict(os.environ, JUPYTER_RUNTIME_DIR=str(runtime)))
    try:
        def start_kernel():
            request = urllib.request.Request(f"http://127.0.0.1:{port}/api/kernels", data=b'{"name": "python3"}',
                                             headers={"Authorization": "token test"}, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=5) as answer:
                    return json.load(answer)["id"]
            except OSError:
                return None  # JupyterLab not listening yet, or no kernel
        kernel_id = wait_until(start_kernel, 60, f"JupyterLab started no kernel:\n{log.read_text()[-2000:]}")
        # The notebooks' figure and links into docs/ open in the lab, and it opens on notebooks/.
        for path in ("files/docs/figures/parties.svg", "files/docs/glossary.md", "api/contents/notebooks/es"):
            with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/{path}",
                                                               headers={"Authorization": "token test"})) as got:
                assert got.status == 200, path
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/",
                                                           headers={"Authorization": "token test"})) as got:
            assert got.url.endswith("/lab/tree/notebooks"), got.url
        kernel = wait_until(lambda: kernel_of(lab), 30, "the kernel did not start")
        if runtime_folder == "usual":
            wait_until(lambda: len(list(runtime.glob(f"kernel-{kernel_id}-ipc-*"))) == 5, 30,
                       f"the kernel opened no Unix sockets:\n{log.read_text()[-2000:]}")
            sockets = listening([kernel.pid])
            assert len(sockets) <= 1 and set(sockets.values()) <= LOOPBACK, sockets  # the children's pipe at most
            assert "without encryption" not in log.read_text()
        else:
            sockets = wait_until(lambda: len(listening([kernel.pid])) >= 5 and listening([kernel.pid]), 30,
                                 f"no kernel on TCP:\n{log.read_text()[-2000:]}")
            assert set(sockets.values()) <= LOOPBACK
    finally:
        lab.terminate()
        lab.wait(30)
        shutil.rmtree(base, ignore_errors=True)
