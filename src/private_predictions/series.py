"""Run the tutorial series headless: ``python -m private_predictions.series [OUTPUT_DIR]``.

Notebook 01 runs first (it writes the model); 02 and 03 then run at the same time,
each in its own kernel, as a reader runs them: one serving, the other querying.
"""
import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .paths import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
# Each inner list runs concurrently; the stages run one after another.
NOTEBOOK_STAGES = [
    ["01_public_training.ipynb"],
    ["02_secure_serving.ipynb", "03_private_prediction.ipynb"],
]
# The cells of 03 whose output the main command repeats.
SUMMARY_MARKERS = ("private prediction", "same predicted digits")


def execute_notebook(name: str, output_dir: Path, timeout: int = 600) -> Path:
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    # No timing metadata: committed notebooks carry no timestamps.
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)
    NotebookClient(notebook, timeout=timeout, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(NOTEBOOK_DIR)}}).execute()
    output = output_dir / name
    nbformat.write(notebook, output)
    return output


def stdout_containing(path: Path, markers) -> str:
    import nbformat

    texts = []
    for cell in nbformat.read(path, as_version=4).cells:
        for output in cell.get("outputs", []):
            text = output.get("text", "") if output.get("name") == "stdout" else ""
            if any(marker in text for marker in markers):
                texts.append(text)
    return "".join(texts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output_dir", nargs="?", default=str(REPO_ROOT / "build" / "notebooks"))
    parser.add_argument("--stages", action="store_true", help="print the stages, one line each, and exit")
    args = parser.parse_args(argv)
    if args.stages:
        for stage in NOTEBOOK_STAGES:
            print(" ".join(f"notebooks/{name}" for name in stage))
        return 0
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    executed = {}
    for stage in NOTEBOOK_STAGES:
        print("executing", " and ".join(stage), "..." if len(stage) == 1 else "at the same time ...", flush=True)
        with ThreadPoolExecutor(len(stage)) as pool:
            for name, path in zip(stage, pool.map(lambda n: execute_notebook(n, output_dir), stage)):
                executed[name] = path
    print("\nexecuted notebooks:")
    for path in executed.values():
        print("  ", path)
    print("\nprivate predictions (from 03_private_prediction.ipynb):")
    print(stdout_containing(executed["03_private_prediction.ipynb"], SUMMARY_MARKERS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
