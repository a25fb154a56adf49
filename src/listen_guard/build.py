"""Build the listen guard for this environment: ``python -m listen_guard.build``.

Called by ``make setup``. Uses the C compiler the machine has (``$CC``, ``cc``, ``gcc``,
``clang``), or the Zig toolchain's C compiler from the package index (the ``ziglang``
package, which ``make setup`` installs when the machine has no compiler). Then it puts
``listen_guard.pth`` in site-packages, so that every Python of the environment starts
with the guard (``boot.py``).
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from . import LIBRARY, SOURCE

PTH = Path(sysconfig.get_paths()["purelib"]) / "listen_guard.pth"


def compilers():
    if os.environ.get("CC"):
        yield os.environ["CC"].split()
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            yield [name]
    try:
        import ziglang  # noqa: F401
        yield [sys.executable, "-m", "ziglang", "cc"]
    except ImportError:
        pass


def build() -> Path:
    LIBRARY.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for compiler in compilers():
        with tempfile.TemporaryDirectory(dir=LIBRARY.parent) as folder:
            built = Path(folder) / LIBRARY.name
            command = [*compiler, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(built), str(SOURCE), "-ldl", "-lpthread"]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(built, LIBRARY)  # in one step: a process starting now never sees half a library
                return LIBRARY
            errors.append(f"{' '.join(compiler)}: {result.stderr.strip()[-500:]}")
    raise SystemExit("Could not build the listen guard, which keeps TensorFlow's servers off the network:\n"
                     + ("\n".join(errors) or "no C compiler found (cc, gcc, clang or the ziglang package)"))


def main() -> None:
    library = build()
    PTH.write_text("import listen_guard.boot\n")
    print(f"listen guard built: {library}")


if __name__ == "__main__":
    main()
