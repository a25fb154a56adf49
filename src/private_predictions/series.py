"""Run the tutorial series headless: ``python -m private_predictions.series [--language es] [OUTPUT_DIR]``.

Notebook 01 runs first (it writes the model); 02 and 03 then run at the same time,
each in its own kernel, as a reader runs them: one serving, the other querying. Once 03
is done, 02's last cell, which serves until interrupted, is interrupted, as a reader ends
it (■). The Spanish twins live in ``notebooks/es`` and run the same way.
"""
import argparse
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from .paths import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
# Each inner list runs concurrently; the stages run one after another. Paths are relative to
# NOTEBOOK_DIR. In a stage of several, the first serves until the others are done, and is then
# interrupted (scripts/test.sh does the same). The two languages never run at the same time: both
# would serve from cluster.json.
NOTEBOOK_STAGES = {
    "en": [["01_public_training.ipynb"],
           ["02_secure_serving.ipynb", "03_private_prediction.ipynb"]],
    "es": [["es/01_entrenamiento_publico.ipynb"],
           ["es/02_servicio_seguro.ipynb", "es/03_prediccion_privada.ipynb"]],
}
# What the main command repeats from the last notebook's output.
SUMMARY_MARKERS = ("private prediction", "same predicted digits", "predicción privada", "mismos dígitos")


class StageStopped(RuntimeError):
    """Another notebook of the stage failed: this one was stopped."""


def interrupt(client) -> None:
    """What Jupyter's "Interrupt the kernel" sends (client.km's own call is a coroutine)."""
    pid = getattr(getattr(client.km, "provisioner", None), "pid", None)
    if pid:
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            pass  # it has ended already


def execute_stage(stage, output_dir: Path):
    """Execute the stage's notebooks at the same time; return their output paths.

    The first notebook of a stage of several (02) serves in its last cell until it is interrupted:
    once the others (03) are done, it is, as a reader would end it (■). When one notebook fails,
    the others stop (a running cell is interrupted, no further cell starts), so the stage ends
    at once instead of at the serve cell's timeout.
    """
    clients, failed, causes = {}, threading.Event(), []

    def before_each_cell(**_):
        if failed.is_set():
            raise StageStopped("stopped: another notebook of this stage failed")

    def execute(name):
        try:
            return execute_notebook(name, output_dir, started=lambda client: clients.__setitem__(name, client),
                                    on_cell_start=before_each_cell)
        except BaseException as error:
            if not failed.is_set():
                causes.append(error)
            failed.set()
            for other, client in list(clients.items()):
                if other != name:
                    interrupt(client)
            raise

    with ThreadPoolExecutor(len(stage)) as pool:
        running = [pool.submit(execute, name) for name in stage]
        if len(stage) > 1:
            wait(running[1:])
            if not failed.is_set():  # the clients are done: end the serving, as its reader would
                interrupt(clients[stage[0]])
    if causes:
        raise causes[0]  # the notebook that failed first: the others were stopped because of it
    return [future.result() for future in running]


def execute_notebook(name: str, output_dir: Path, timeout: int = 600, started=lambda client: None,
                     on_cell_start=None) -> Path:
    import nbformat
    from nbclient import NotebookClient

    source = NOTEBOOK_DIR / name
    notebook = nbformat.read(source, as_version=4)
    # No timing metadata: committed notebooks carry no timestamps.
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)
    # The kernel talks to this runner over loopback only; its warning that this local channel
    # is unencrypted has nothing to do with the series' privacy, and alarmed readers of `make run`.
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", record_timing=False,
                            extra_arguments=["--IPKernelApp.log_level=ERROR"],
                            resources={"metadata": {"path": str(source.parent)}}, on_cell_start=on_cell_start)
    started(client)
    client.execute()
    output = output_dir / name
    output.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, output)
    return output


def stdout_containing(path: Path, markers) -> str:
    import nbformat

    lines = []
    for cell in nbformat.read(path, as_version=4).cells:
        # A kernel may send one printed line in several pieces ("... the plaintext model:" then " True"):
        # the cell's whole printed text is put together before it is cut into lines.
        text = "".join(output.get("text", "") for output in cell.get("outputs", []) if output.get("name") == "stdout")
        lines += [line + "\n" for line in text.splitlines() if any(marker in line for marker in markers)]
    return "".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output_dir", nargs="?", default=str(REPO_ROOT / "build" / "notebooks"))
    parser.add_argument("--language", choices=sorted(NOTEBOOK_STAGES), action="append",
                        help="which series to run (default: en); may be given twice")
    parser.add_argument("--stages", action="store_true", help="print the stages, one line each, and exit")
    args = parser.parse_args(argv)
    stages = [stage for language in (args.language or ["en"]) for stage in NOTEBOOK_STAGES[language]]
    if args.stages:
        for stage in stages:
            print(" ".join(f"notebooks/{name}" for name in stage))
        return 0
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    executed = {}
    for stage in stages:
        print("executing", " and ".join(stage), "..." if len(stage) == 1 else "at the same time ...", flush=True)
        for name, path in zip(stage, execute_stage(stage, output_dir)):
            executed[name] = path
    print("\nexecuted notebooks:")
    for path in executed.values():
        print("  ", path)
    last = stages[-1][-1]
    print(f"\nprivate predictions (from {last}):")
    print(stdout_containing(executed[last], SUMMARY_MARKERS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
