"""The worked solutions (docs/solutions.md, docs/es/soluciones.md) run, as a learner would run them.

Each code block starts with a comment naming its notebook; it runs in a kernel that has run that
notebook's own cells, against servers of the test's own, in the order a learner alone would take:
02 run to its last cell, which serves; 03 run whole, then its exercises; then 02 interrupted, which
stops the servers; then 02's exercises, which need no servers.
"""
import ast
import builtins
import os
import re
import signal
import time
from pathlib import Path

import pytest

from private_predictions.paths import REPO_ROOT
from private_predictions.series import NOTEBOOK_DIR
from test_translations import by_number, cells, code_without_words, source

SOLUTIONS = {"en": REPO_ROOT / "docs" / "solutions.md", "es": REPO_ROOT / "docs" / "es" / "soluciones.md"}
NOTEBOOK_NAMED = re.compile(r"# (?:in|en el) notebook (0\d)")
EXERCISE = re.compile(r"^### (\d\d\.\d) ", re.M)


def solution_blocks(path: Path):
    """[(exercise, notebook, code)] in the page's order."""
    found, exercise = [], None
    for part in re.split(r"(^### [^\n]*$|^```python\n.*?^```$)", path.read_text(), flags=re.M | re.S):
        heading = EXERCISE.match(part)
        if heading:
            exercise = heading[1]
        elif part.startswith("```python"):
            code = part[len("```python\n"):-3]
            notebook = NOTEBOOK_NAMED.match(code)
            assert notebook, f"{path.name}, {exercise}: a code block must start with the notebook it runs in"
            found.append((exercise, notebook[1], code))
    return found


def test_every_exercise_has_a_solution_in_both_languages():
    numbered = re.compile(r"^(\d)\. ", re.M)
    exercises = set()
    for number, path in by_number(NOTEBOOK_DIR).items():
        last = source(cells(path)[-1])
        exercises |= {f"{number}.{n}" for n in numbered.findall(last.split("## Exercises")[1])}
    assert len(exercises) == 14
    for path in SOLUTIONS.values():
        assert set(EXERCISE.findall(path.read_text())) == exercises, path.name


def test_the_spanish_solutions_run_the_same_code():
    english, spanish = (solution_blocks(path) for path in SOLUTIONS.values())
    assert [(e, n) for e, n, _ in english] == [(e, n) for e, n, _ in spanish]
    for (exercise, _, ours), (_, _, theirs) in zip(english, spanish):
        assert code_without_words(ours) == code_without_words(theirs), exercise


def names(code: str):
    """(names the code binds, names it reads)."""
    bound, read = set(), set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return bound, read


def test_each_solution_needs_only_its_notebook_and_its_own_earlier_blocks():
    # The test below runs the blocks one after another in one kernel: a block that uses a name only an
    # earlier exercise's block defines would pass there, and fail for a teacher who runs it alone.
    from_notebook = {number: set(dir(builtins)).union(*(names(code)[0] for code in notebook_code(number)))
                     for number in ("01", "02", "03")}
    earlier = {}
    for exercise, notebook, code in solution_blocks(SOLUTIONS["en"]):
        known = from_notebook[notebook] | earlier.setdefault((exercise, notebook), set())
        bound, read = names(code)
        assert read <= known | bound, f"{exercise}: {sorted(read - known - bound)} come from another exercise"
        earlier[(exercise, notebook)] |= bound


class Kernel:
    """A notebook's kernel, started in ``home`` as the repository (its cluster file and card go there)."""

    def __init__(self, home: Path):
        from jupyter_client.manager import start_new_kernel

        env = dict(os.environ, PRIVATE_PREDICTIONS_HOME=str(home), MPLBACKEND="Agg")
        self.manager, self.client = start_new_kernel(kernel_name="python3", env=env, cwd=str(NOTEBOOK_DIR))
        # A run that never ends asks the kernel where its threads are (see stuck): binds no name.
        self.run("__import__('faulthandler').register(__import__('signal').SIGUSR1, all_threads=True)", 60)

    def start(self, code: str) -> str:
        return self.client.execute(code)

    def finish(self, started: str, timeout: float = 300, until_printed=None) -> str:
        """What the execution ``started`` printed, once it has ended (or once it printed ``until_printed``)."""
        printed, error, deadline = [], None, time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise AssertionError(self.stuck(f"no end in {timeout} s; printed:\n{''.join(printed)}"))
            try:
                message = self.client.get_iopub_msg(timeout=1)
            except Exception:  # noqa: BLE001  (queue.Empty: nothing yet)
                continue
            if message["parent_header"].get("msg_id") != started:
                continue
            kind, content = message["msg_type"], message["content"]
            if kind == "stream":
                printed.append(content["text"])
                if until_printed and until_printed in "".join(printed):
                    return "".join(printed)
            elif kind == "error":
                error = f"{content['ename']}: {content['evalue']}"
            elif kind == "status" and content["execution_state"] == "idle":
                self.client.get_shell_msg(timeout=10)
                if error:
                    raise AssertionError(f"{error}\nprinted:\n{''.join(printed)}")
                return "".join(printed)

    def stuck(self, what: str) -> str:
        """``what``, and whether the kernel died; if not, its threads' stacks go to its stderr (pytest shows it)."""
        if not self.manager.is_alive():
            return f"{what}\nThe kernel died (exit code {self.manager.provisioner.process.poll()})."
        os.kill(self.manager.provisioner.pid, signal.SIGUSR1)
        time.sleep(1)  # not a race: the kernel writes its stacks before the test fails and shows them
        return f"{what}\nThe kernel is alive: its threads' stacks are in the captured stderr below."

    def run(self, code: str, timeout: float = 300) -> str:
        return self.finish(self.start(code), timeout)

    def stop(self):
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


def notebook_code(number: str, until=None):
    """The code cells of English notebook ``number``, up to the first containing ``until``."""
    code = [source(cell) for cell in cells(by_number(NOTEBOOK_DIR)[number]) if cell["cell_type"] == "code"]
    if until:
        code = code[:next(i for i, text in enumerate(code) if until in text)]
    return code


@pytest.fixture
def home(tmp_path):
    """A repository of the test's own: the same data and model, its own cluster file and card."""
    for folder in ("data", "models"):
        (tmp_path / folder).symlink_to(REPO_ROOT / folder)
    return tmp_path


def blocks_of(notebook: str):
    found = [(exercise, code) for exercise, number, code in solution_blocks(SOLUTIONS["en"]) if number == notebook]
    assert found, f"no solution runs in notebook {notebook}"
    return found


def test_the_solutions_to_notebook_01_run(home):
    kernel = Kernel(home)
    try:
        for code in notebook_code("01", until="model.save("):  # the committed model stays as it is
            kernel.run(code)
        for exercise, code in blocks_of("01"):
            print(exercise, kernel.run(code))  # shown with pytest -s: what the page describes
    finally:
        kernel.stop()


def test_the_solutions_to_notebooks_02_and_03_run(home):
    owner, client = Kernel(home), Kernel(home)
    try:
        serve_cell = notebook_code("02")[-1]
        assert ".serve()" in serve_cell
        for code in notebook_code("02")[:-1]:
            owner.run(code)
        serving = owner.start(serve_cell)
        owner.finish(serving, 60, until_printed="Clients may ask now")
        for code in notebook_code("03"):  # Run All
            client.run(code)
        for exercise, code in blocks_of("03"):  # then the exercises, with 02 still serving
            print(exercise, client.run(code))

        # The learner ends serving (■): the serve cell ends without an error, and the servers stop.
        owner.manager.interrupt_kernel()
        said = owner.finish(serving, 30)
        assert "Stopped serving after" in said and "interrupted" in said, said
        assert "False" not in owner.run("print(all(not alive for alive in cluster.alive().values()))")
        start = time.monotonic()
        refused = client.run("try:\n    client.predict_logits(images[:1])\nexcept Exception as error:\n"
                             "    print(type(error).__name__, error)")
        print("after serving ended, 03 is told:", refused)
        assert refused.startswith(("DoorError", "ServingStoppedError")) and time.monotonic() - start < 5

        for exercise, code in blocks_of("02"):  # none needs the servers
            print(exercise, owner.run(code))
    finally:
        owner.stop()
        client.stop()
