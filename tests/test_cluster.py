"""Starting, stopping and failing to reach the servers: clear errors, bounded times, no leftovers."""
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from private_predictions import ClusterError, LocalCluster, RemoteCluster
from private_predictions.cluster import wait_for_servers
from private_predictions.cluster import LOCK_DIR
from private_predictions.ports import find_free_base_port, free_ports, port_is_open
from private_predictions.commands import server as server_command
from private_predictions.config import SERVER_NAMES, ClusterConfig


def wait_for_exit(pids, timeout):
    gone, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout)
    return [p.pid for p in alive]


def test_stop_leaves_no_process_and_nothing_in_the_temporary_folder(tmp_path):
    cluster = LocalCluster.start(base_port=find_free_base_port(), config_path=tmp_path / "c.json")
    pids = list(cluster.pids.values())
    assert all(psutil.pid_exists(pid) for pid in pids)
    logs = Path(server_command.parse_command(cluster.processes["server0"].args).config).parent
    assert logs.name.startswith("private-predictions-") and logs.exists()
    locks = [LOCK_DIR / f"port-{cluster.config.address(name)[1]}.lock" for name in SERVER_NAMES]
    cluster.stop()
    assert not any(psutil.pid_exists(pid) for pid in pids)
    assert not (tmp_path / "c.json").exists()
    assert not logs.exists() and not any(lock.exists() for lock in locks)


def test_a_start_deletes_the_folders_that_killed_starters_left_and_only_those(tmp_path):
    from private_predictions.cluster import remove_abandoned_folders

    killed = subprocess.Popen(["true"])
    killed.wait()
    left = tmp_path / f"private-predictions-{killed.pid}-k1ll3d"
    running = tmp_path / f"private-predictions-{os.getpid()}-runn1ng"
    other = tmp_path / "private-predictions-locks"
    for folder in (left, running, other):
        folder.mkdir()
        (folder / "server0.log").write_text("")
    remove_abandoned_folders(tmp_path)
    assert not left.exists() and running.exists() and other.exists()


@pytest.mark.parametrize("end", ["restart", "kill"])
def test_a_restarted_or_killed_notebook_kernel_leaves_no_server(tmp_path, end):
    from jupyter_client.manager import start_new_kernel

    manager, kernel = start_new_kernel(kernel_name="python3")
    try:
        printed = []
        kernel.execute_interactive(
            "from private_predictions import LocalCluster\n"
            f"cluster = LocalCluster.start(base_port={find_free_base_port()}, "
            f"config_path={str(tmp_path / 'c.json')!r})\n"
            "print(*cluster.pids.values())",
            timeout=60,
            output_hook=lambda message: printed.append(message["content"].get("text", "")))
        pids = [int(pid) for pid in "".join(printed).split()]
        assert len(pids) == 3 and all(psutil.pid_exists(pid) for pid in pids)
        if end == "restart":
            manager.restart_kernel(now=False)  # what Jupyter's "Restart kernel" does
        else:  # a crash, or the out-of-memory killer
            os.kill(manager.provisioner.pid, signal.SIGKILL)
        assert wait_for_exit(pids, timeout=15) == []
    finally:
        kernel.stop_channels()
        manager.shutdown_kernel(now=True)


def test_busy_port_is_named_with_its_process(tmp_path):
    base = find_free_base_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", base + 1))
        squatter.listen()
        with pytest.raises(ClusterError, match=rf"port {base + 1} is in use by process {os.getpid()}"):
            LocalCluster.start(base_port=base, config_path=tmp_path / "c.json")


def start_lone_server0(config_path, started_by):
    """server0 as LocalCluster would start it on behalf of ``started_by``, but with no link to it."""
    server = subprocess.Popen(server_command.command(config_path, "server0", started_by=started_by,
                                                     cluster_file=config_path.resolve()),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not port_is_open(*ClusterConfig.load(config_path).address("server0")):
        assert server.poll() is None and time.monotonic() < deadline, "server0 did not start"
        time.sleep(0.1)
    return server


def test_a_server_of_ours_left_from_an_earlier_run_is_replaced(tmp_path):
    config_path, base = tmp_path / "c.json", find_free_base_port()
    ClusterConfig.local(range(base, base + 3)).save(config_path)
    earlier_run = subprocess.Popen(["true"])
    earlier_run.wait()
    leftover = start_lone_server0(config_path, started_by=earlier_run.pid)
    try:
        with LocalCluster.start(base_port=base, config_path=config_path) as cluster:
            assert leftover.wait(15) is not None
            assert cluster.pids["server0"] != leftover.pid and all(cluster.alive().values())
    finally:
        leftover.kill()
        leftover.wait(10)


def test_a_server_of_another_running_cluster_is_left_alone(tmp_path):
    config_path, base = tmp_path / "c.json", find_free_base_port()
    ClusterConfig.local(range(base, base + 3)).save(config_path)
    other_kernel = subprocess.Popen(["sleep", "120"])
    server = start_lone_server0(config_path, started_by=other_kernel.pid)
    try:
        with pytest.raises(ClusterError, match=rf"held by server0 of a cluster that process {other_kernel.pid} "
                                               r"\(sleep 120\) started and still runs"):
            LocalCluster.start(base_port=base, config_path=config_path)
        assert server.poll() is None
    finally:
        for process in (server, other_kernel):
            process.kill()
            process.wait(10)


def test_a_configuration_naming_other_machines_is_never_overwritten(tmp_path):
    config_path = tmp_path / "cluster.json"
    elsewhere = ClusterConfig({name: f"10.0.0.{10 + i}:4440" for i, name in enumerate(SERVER_NAMES)})
    elsewhere.save(config_path)
    with pytest.raises(ClusterError, match=r"names servers on other machines .*RemoteCluster.join\(\)"):
        LocalCluster.start(base_port=find_free_base_port(), config_path=config_path)
    assert ClusterConfig.load(config_path) == elsewhere


@pytest.mark.parametrize("connect, says", [
    (wait_for_servers, "not answering"),
    (RemoteCluster.join, "not answering.*python -m private_predictions.commands.server"),  # how to start them
], ids=["serving side waiting for servers", "model owner joining servers elsewhere"])
def test_unreachable_servers_fail_fast(tmp_path, connect, says):
    config_path = tmp_path / "c.json"
    ClusterConfig.local(free_ports(3)).save(config_path)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=says):
        connect(config_path, timeout=2)
    assert time.monotonic() - start < 10


def test_joining_servers_elsewhere_without_a_configuration_says_what_to_write(tmp_path):
    with pytest.raises(FileNotFoundError, match="naming the three servers"):
        RemoteCluster.join(tmp_path / "c.json")


def test_missing_configuration_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="notebook 02"):
        wait_for_servers(tmp_path / "absent.json", timeout=1)
    assert time.monotonic() - start < 5
