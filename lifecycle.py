"""The run's lifecycle, around the training loop: the stop after non-finite losses, one run per
workdir, stop signals, loader workers' signals, stalls and deaths, and the launcher's death
(checkpoint files, resume and save: checkpoints.py).

`train.py` drives these; `data.py`'s loader starts its workers with `loader_worker_init`.
"""

import contextlib
import ctypes
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from absl import logging



def stop_if_diverged(state, cfg, ckpt_dir):
    """A clean stop after config.runtime.max_nonfinite consecutive skipped steps (checked at log steps)."""
    run_len = int(state.nonfinite_run)
    if run_len:
        logging.warning('step %d: non-finite loss, step skipped (%d in a row)', state.step, run_len)
    if run_len >= cfg.runtime.max_nonfinite:
        raise SystemExit(f'stopping: {run_len} consecutive non-finite losses at step {state.step} (config.'
                         f'max_nonfinite={cfg.runtime.max_nonfinite}); the last checkpoint in {ckpt_dir} is intact')


# ----------------------------------------------------------------------------------------------
# One run per workdir, preemption, launcher death
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def workdir_lock(workdir):
    """An exclusive lock on `workdir` for the life of this process (flock: the kernel drops it
    when the process dies, however it dies). A second run on the same workdir stops at once,
    naming the holder. (flock is per host on some network file systems.)"""
    import fcntl
    path = Path(workdir) / 'run.lock'
    f = open(path, 'a+')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or 'another process'
        f.close()
        raise RuntimeError(f'{workdir} is in use by another run ({holder}); wait for it to end or use '
                           f'another --workdir') from None
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on {socket.gethostname()} since {time.strftime("%Y-%m-%d %H:%M:%S")}\n')
    f.flush()
    try:
        yield
    finally:
        f.close()


class StopSignals:
    """SIGTERM / SIGINT (preemption, Ctrl-C) set `received`; the loop then finishes its step,
    writes a checkpoint and exits non-zero. A second signal ends the process at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received, self._previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.received is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signal.Signals(signum).name
        print(f'{self.received}: stopping after this step and writing a checkpoint (send it again to exit '
              f'at once)', file=sys.stderr, flush=True)


def loader_worker_init(worker_id):
    """One thread per worker; SIGINT / SIGTERM from anyone else (Ctrl-C reaches the whole process
    group, torchrun and schedulers signal every process) are the training process's to handle: it
    finishes its step and saves, which a worker dying of them would fail. The training process's
    own SIGTERM (the parent's, as torch's workers see it), which interpreter exit sends to the
    workers of a loader still alive (after an error, say), ends the worker: the exit never waits
    on it. Otherwise workers end with the loader."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())  # the watcher takes no other signal
    threading.Thread(target=_end_on_sigterm_from, args=(os.getppid(),), daemon=True).start()
    signal.pthread_sigmask(signal.SIG_SETMASK, mask | {signal.SIGTERM})


def _end_on_sigterm_from(pid):
    """Wait for SIGTERMs (blocked in every thread, so they queue for this one) and end the
    process at the first one sent by `pid`."""
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != pid:
        pass
    os._exit(0)


def release_loader(batches):
    """End a loader iterator's workers now: after an exception its traceback may hold the
    iterator past the end of the run (torch's iterators have no public close)."""
    getattr(batches, '_shutdown_workers', lambda: None)()


def exit_with_parent():
    """Under torchrun, end this worker when its launcher dies: a launcher killed with SIGKILL
    cannot stop its workers, and they would otherwise run on as orphans. Linux: the kernel's
    parent-death signal; elsewhere a thread that watches the parent pid."""
    if 'TORCHELASTIC_RUN_ID' not in os.environ:
        return
    parent = os.getppid()
    try:
        if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) != 0:  # PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), 'prctl')
    except (OSError, AttributeError):
        def watch():
            while os.getppid() == parent:
                time.sleep(1)
            os._exit(1)
        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the launcher died before the signal was asked for
        os._exit(1)


# ----------------------------------------------------------------------------------------------
# Outputs checked before any work; loader workers that stall or die
# ----------------------------------------------------------------------------------------------

def _no_folder(path):
    """Why `path`, which exists (maybe as a link), is no folder to write into, or None."""
    if path.is_symlink() and not path.exists():
        return f'a symbolic link to {os.readlink(path)}, which does not exist'
    if not path.is_dir():
        return 'a file, not a folder'
    return None


def prepare_workdir(workdir, create=True):
    """Refuse a --workdir (named as given) the run cannot write, before any work: a file, a folder
    below a file, a dangling `checkpoints` or `tb` link, a folder that cannot be created or
    written. `create`: make workdir/checkpoints (the first process), and try a write in each."""
    path = Path(workdir)
    existing = next(p for p in (path, *path.parents) if os.path.lexists(p))
    found = [(existing, _no_folder(existing))]
    if existing == path:
        found += [(path / name, _no_folder(path / name)) for name in ('checkpoints', 'tb') if os.path.lexists(path / name)]
    for where, problem in found:
        if problem:
            raise ValueError(f'--workdir {workdir}: ' + ('' if where == path else f'{where}: ') + problem)
    for where in (path, path / 'checkpoints') if create else ():
        try:
            where.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=where):
                pass
        except OSError as e:
            raise ValueError(f'--workdir {workdir}: cannot write {where}: {e.strerror or e}') from None


class WorkerDeaths:
    """Loader workers' deaths held for the loop: torch's SIGCHLD handler would raise in whatever the
    training process runs, a checkpoint write included; here a death is recorded and `check`, between
    steps, reports it as torch does (a RuntimeError naming the worker)."""

    def __init__(self):
        self.held, self.previous, self.installed = [], None, False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGCHLD, lambda signum, frame: self.held.append(signum))
            self.installed = True
        return self

    def __exit__(self, *exc):
        if self.installed:   # a death after the last step costs nothing: not reported
            signal.signal(signal.SIGCHLD, signal.SIG_DFL if self.previous is None else self.previous)

    def check(self):
        if self.held and callable(self.previous):
            self.held.clear()
            self.previous(signal.SIGCHLD, None)


def loader_fault(error, timeout_s):
    """What torch's DataLoader error `error` says of its workers, in the run's words, or None when it
    is another error."""
    text = str(error)
    if text.startswith('DataLoader timed out'):
        return (f'no batch from the loader workers for {timeout_s:g} s (data.limits.batch_timeout_s): a worker '
                f'stopped responding')
    if text.startswith('DataLoader worker (pid') and ('exited unexpectedly' in text or 'killed by signal' in text):
        return f'a loader worker died ({text.splitlines()[0].strip().rstrip(".")})'
    return None
