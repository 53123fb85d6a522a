import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402

MARK = f'DECLIP_TEST_SUITE={os.getpid()}'.encode()


@pytest.fixture(scope='session')
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo')
    from tools import demo
    demo.make_demo(out, train=240, val=60, workers=2)
    return out


@pytest.fixture(scope='session')
def two_process_smoke(demo_dir, tmp_path_factory):
    """The smoke config on 2 processes, run once for every test that reads it: {'full': its 6 steps
    in one go, 'part': stopped after step 3}. Read only: a test copies a run before resuming it."""
    from helpers import smoke_overrides, torchrun
    runs = {}
    for name, extra in (('full', {}), ('part', {'stop_at': 3})):
        runs[name] = tmp_path_factory.mktemp(name)
        res = torchrun(runs[name], smoke_overrides(demo_dir, **extra))
        assert res.returncode == 0, res.stderr[-3000:]
    return runs


@pytest.fixture(scope='session')
def full_run(tmp_path_factory, demo_dir):
    """The smoke config with QUEUE-row NN queues (helpers.py: the pointer wraps), its 6 steps in one
    go, 2 processes, LR logged every step."""
    from helpers import queue_overrides, torchrun
    workdir = tmp_path_factory.mktemp('full')
    res = torchrun(workdir, queue_overrides(demo_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    return workdir


@pytest.fixture(scope='session')
def accumulating_run(tmp_path_factory, demo_dir):
    """2 processes x accum_steps 2 (fault_runs.overrides: a checkpoint every 2 steps), its 4 steps in
    one go under tests/hccl_rules.py: (the workdir, the folder of each rank's collectives). Read only."""
    from fault_runs import overrides
    from helpers import free_port, run
    out = tmp_path_factory.mktemp('accumulating')
    res = run(['-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(free_port()),
               'tests/hccl_rules.py', str(out / 'collectives'), 'train.py', '--config', 'configs/demo.py:smoke',
               '--workdir', str(out / 'run'), *overrides(demo_dir, max_iter=4, accum_steps=2)])
    assert res.returncode == 0, res.stderr[-3000:]
    return out / 'run', out / 'collectives'


def _parent(proc):
    stat = (proc / 'stat').read_text()
    return int(stat[stat.rindex(')') + 2:].split()[1])


def _left_behind():
    """Processes started by this test session that are still alive, but multiprocessing's own
    helper (it lives as long as this process): those that inherit the mark (started with exec), and
    this process's own children (forked ones, e.g. loader workers of a test's loader, whose
    environment in /proc is the one before the mark)."""
    found = []
    for d in Path('/proc').iterdir() if Path('/proc').is_dir() else []:
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / 'cmdline').read_bytes().replace(b'\0', b' ').decode(errors='replace')
                ours = MARK in (d / 'environ').read_bytes().split(b'\0') or _parent(d) == os.getpid()
                if ours and 'resource_tracker' not in cmd:
                    found.append((int(d.name), cmd[:200]))
            except (OSError, ValueError, IndexError):
                pass
    return found


@pytest.fixture(scope='session', autouse=True)
def no_process_left_behind():
    """The suite ends with no process it started still running (killed and reported if any)."""
    os.environ['DECLIP_TEST_SUITE'] = str(os.getpid())
    yield
    deadline = time.time() + 15           # workers of a run that just ended may still be exiting
    while _left_behind() and time.time() < deadline:
        time.sleep(0.5)
    left = _left_behind()
    for pid, _ in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f'processes left behind: {left}'
