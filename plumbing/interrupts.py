# plumbing/interrupts.py: Ctrl-C (SIGINT) from a script's first import to its exit status. Every one ends the
# process with one line and exit status 130, wherever it lands: during the imports, inside a finalizer that would
# swallow it, in a library's broad `except`, after the run finished, during the exit. The scripts import it first
# (before torch); plumbing/errors.cli runs main() through run() and settles the exit status. It imports nothing from
# the project and nothing heavy.

import os
import signal
import sys
import threading

_state = {"hit": False, "installed": False, "previous": None}


def _imported_by_main() -> bool:
    # whether the module importing this one is the program itself (a script run as `python train_nlu.py`), not a
    # module that pytest or another program imports
    f = sys._getframe(1)
    while f is not None and (f.f_globals.get("__name__") == __name__ or f.f_code.co_filename.startswith("<frozen")):
        f = f.f_back
    return f is not None and f.f_globals.get("__name__") == "__main__"


def is_main_script(prog) -> bool:
    # prog (a script's __file__) is the program this process runs, so that its exit is the process's
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    return bool(path) and os.path.realpath(path) == os.path.realpath(prog)


def _early(signum, frame):
    # Ctrl-C while the script still imports torch and friends: nothing is written yet, so the process ends at once
    # (a KeyboardInterrupt here would be a traceback from deep inside an import)
    os.write(2, f"{os.path.basename(sys.argv[0] or 'python')}: interrupted\n".encode("utf-8", "replace"))
    os._exit(130)


def run(main, argv):
    # main(argv); a Ctrl-C raises KeyboardInterrupt only while this frame is on the stack (see _on_sigint)
    return main(argv)


def _on_sigint(signum, frame):
    # Remembered always; raised as KeyboardInterrupt inside main() only. Outside it (errors.cli printing a line,
    # leaving, the exit itself) a raise would escape every handler as a traceback or be dropped by the shutdown:
    # settle() turns the remembered Ctrl-C into the exit status instead.
    _state["hit"] = True
    if in_main(frame):
        raise KeyboardInterrupt


def in_main(frame) -> bool:
    # whether `frame` (a signal handler's) runs inside main(), i.e. below run() on the stack
    while frame is not None:
        if frame.f_code is run.__code__:
            return True
        frame = frame.f_back
    return False


def _unraisable(hook):
    # A KeyboardInterrupt raised inside a finalizer (a generator closed by the garbage collector, a __del__) is
    # "ignored" by Python: the run would go on as if no Ctrl-C came. It is raised again in the main thread, at the
    # next instruction outside the finalizer.
    def handle(unraisable):
        if issubclass(unraisable.exc_type, KeyboardInterrupt) and _state["installed"]:
            _reraise()
        else:
            hook(unraisable)
    handle._balora = True
    return handle


def _reraise():
    # The Ctrl-C again, from another thread a moment later, so that its handler runs in the main thread once the
    # finalizer and this hook are done (a handler tripped from here would run inside the hook and be swallowed
    # again). At the interpreter's exit no thread starts: settle() still turns it into 130.
    def later():
        import _thread
        import time
        time.sleep(0.01)
        if _state["installed"]:
            _thread.interrupt_main()
    try:
        threading.Thread(target=later, daemon=True).start()
    except RuntimeError:
        pass


def install():
    # plumbing/errors.cli, before main(). Nothing changes where SIGINT is ignored (nohup, a background job) or
    # outside the main thread.
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous in (signal.SIG_IGN, None):
        return
    _state.update(hit=False, installed=True, previous=default_of(previous))
    signal.signal(signal.SIGINT, _on_sigint)
    if not getattr(sys.unraisablehook, "_balora", False):
        sys.unraisablehook = _unraisable(sys.unraisablehook)


def default_of(handler):
    return signal.default_int_handler if handler is _early else handler


def settle(code, prog, restore=False):
    # The exit status, once main() has returned or raised (and every file is closed): a Ctrl-C that came at any
    # time turns a finished run's 0 into 130 with its one line; a run that already failed or was interrupted keeps
    # its status and its one line. The caller exits right after (os._exit: no interpreter shutdown in which Python
    # would restore the default handler and a Ctrl-C would kill the process without a word). restore: cli called
    # inside another program (a test): the handler it had comes back.
    if not _state["installed"]:
        return code
    if restore:
        signal.signal(signal.SIGINT, _state["previous"])
    _state["installed"] = False
    if _state["hit"] and code == 0:
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(2, f"{os.path.basename(prog)}: interrupted (after the run finished: its files are complete)\n"
                 .encode("utf-8", "replace"))
        code = 130
    return code


if _imported_by_main() and threading.current_thread() is threading.main_thread() \
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _early)  # imported first by a script run as a program: until cli() takes over
