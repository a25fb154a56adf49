"""Start this Python again with the listen guard preloaded, before it does anything else.

Run from ``listen_guard.pth`` (put in the environment's site-packages by ``make setup``)
when any Python of the series' environment starts: a notebook's kernel however Jupyter
was opened (``make lab``, VS Code, another JupyterLab using this environment), the
commands, the tests. A preloaded library has to be there when a process starts, and
these processes are often started by programs that are not ours. Replacing the process
(same id, same arguments, same open files) this early is invisible to whoever started it.
"""
import os
import sys


def relaunch_with_guard() -> None:
    import listen_guard

    if not sys.platform.startswith("linux") or not listen_guard.LIBRARY.exists() or listen_guard.is_preloaded():
        return  # already there (or it cannot be had: then starting a TensorFlow server is refused)
    try:
        with open("/proc/self/cmdline", "rb") as file:  # the arguments exactly as given, on any Python
            arguments = [argument.decode(errors="surrogateescape") for argument in file.read().split(b"\0")[:-1]]
    except OSError:
        return
    if not arguments or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *arguments[1:]], listen_guard.preload_environment())


try:
    relaunch_with_guard()
except Exception as error:  # never keep Python from starting; servers are refused later instead
    print(f"listen_guard: could not preload the guard ({error})", file=sys.stderr)
