"""Training runs for fault tests: the 10-step smoke run with frequent checkpoints, its command (1 process
or torchrun), and a SIGKILL of the whole run at a step or during a checkpoint write."""
import os
import signal
import subprocess
import sys
import time

from helpers import ROOT, free_port, smoke_overrides


STEPS = 10


def overrides(demo_dir, **extra):
    base = dict(max_iter=STEPS, ckpt_every=2, keep_every=2, keep_copies=2, val_meta='')
    base.update(extra)
    out = smoke_overrides(demo_dir, **{k: v for k, v in base.items() if k != 'val_meta'})
    return out + ['--config.data.val_meta=']


def command(workdir, args, nproc, script='train.py'):
    launcher = [sys.executable, script] if nproc == 1 else [
        sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc),
        '--master_port', str(free_port()), script]
    return launcher + ['--config', 'configs/demo.py:smoke', '--workdir', str(workdir), *args]


def run_and_kill(workdir, args, nproc, *, at_step=None, during_write=False):
    """Start a run and SIGKILL its whole process group at `step k/` or while a .tmp checkpoint exists
    (each checkpoint write then held by tests/train_faults.py)."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    if during_write:
        env['DECLIP_TEST_PAUSE_BEFORE_RENAME'] = '60'
    script = 'tests/train_faults.py' if during_write else 'train.py'
    proc = subprocess.Popen(command(workdir, args, nproc, script), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    ckpt_dir = workdir / 'checkpoints'
    deadline = time.time() + 300
    try:
        if during_write:
            while not list(ckpt_dir.glob('*.tmp')):
                assert proc.poll() is None and time.time() < deadline, 'run ended before a checkpoint write'
                time.sleep(0.05)
        else:
            for line in proc.stdout:
                if line.startswith(f'step {at_step}/'):
                    break
            else:
                raise AssertionError(f'run ended before step {at_step}')
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL or proc.returncode != 0

