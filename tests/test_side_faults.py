"""Faults beside training never cost the steps trained: a loader worker that stops responding or
dies stops the run between steps with a checkpoint and the cause; TensorBoard on a full disk warns
once and training goes on; a --workdir the run cannot write is refused before any work, named as
given."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lifecycle
import train
from helpers import ROOT, run, smoke_config, smoke_overrides, step_of

RESUME = 'the checkpoint is written: run the same command to resume'


def faulty_run(work, demo_dir, env, **over):
    """tests/train_faults.py on the smoke config, one loader worker, no evaluation."""
    over = {'data.workers': 1, 'data.val_meta': '', **over}
    return [sys.executable, 'tests/train_faults.py', '--config', 'configs/demo.py:smoke', '--workdir', str(work),
            *smoke_overrides(demo_dir, **over)], {**os.environ, 'OMP_NUM_THREADS': '1', **env}


def resumes_to_the_end(work, demo_dir, stopped):
    res = run(['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(work),
               *smoke_overrides(demo_dir, **{'data.workers': 1, 'data.val_meta': ''})])
    assert res.returncode == 0 and f'at step {stopped}' in res.stderr, res.stderr[-3000:]
    assert step_of(work / 'checkpoints' / 'last.pt') == 6


# ---------------------------------------------------------------- loader workers

def test_a_stalled_loader_worker_stops_the_run_with_a_checkpoint(tmp_path, demo_dir):
    """The worker never returns its 5th batch: after data.limits.batch_timeout_s the run stops at
    step 4 (not a checkpoint step) with step 4's checkpoint and the cause, and resumes. Before: the
    run waited forever, SIGTERM included."""
    work, start = tmp_path / 'w', time.time()
    args, env = faulty_run(work, demo_dir, {'DECLIP_TEST_STALL_AT_BATCH': '4'}, **{'data.limits.batch_timeout_s': 5})
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and time.time() - start < 200
    assert res.stderr.splitlines()[-1] == ('stopped at step 4: no batch from the loader workers for 5 s (data.limits.'
                                           f'batch_timeout_s): a worker stopped responding; {RESUME}')
    assert step_of(work / 'checkpoints' / 'last.pt') == 4
    resumes_to_the_end(work, demo_dir, 4)


def _children(pid):
    return [int(d.name) for d in Path('/proc').iterdir() if d.name.isdigit() and _parent(d) == pid]


def _parent(proc):
    try:
        stat = (proc / 'stat').read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(')') + 2:].split()[1])


def test_a_loader_worker_killed_during_a_checkpoint_write_is_named_and_the_checkpoint_kept(tmp_path, demo_dir):
    """SIGKILL of the loader worker while step 3's checkpoint is being written: the write ends, the
    run stops at step 3 naming the worker. Before: torch's SIGCHLD handler raised inside torch.save
    ('[enforce fail at inline_container.cc] unexpected pos'), leaving only last.pt.tmp."""
    work = tmp_path / 'w'
    args, env = faulty_run(work, demo_dir, {'DECLIP_TEST_PAUSE_BEFORE_RENAME': '2'})
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not (work / 'checkpoints' / 'last.pt.tmp').exists():
            assert proc.poll() is None
            time.sleep(0.02)
        workers = _children(proc.pid)
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 1
    assert err.splitlines()[-1] == (f'stopped at step 3: a loader worker died (DataLoader worker (pid {workers[0]}) is '
                                    f'killed by signal: Killed); {RESUME}')
    assert sorted(p.name for p in (work / 'checkpoints').iterdir()) == ['last.pt', 'step_3.pt']
    assert step_of(work / 'checkpoints' / 'last.pt') == step_of(work / 'checkpoints' / 'step_3.pt') == 3
    resumes_to_the_end(work, demo_dir, 3)


def test_loader_faults_are_told_from_other_errors():
    assert lifecycle.loader_fault(RuntimeError('DataLoader timed out after 5.0 seconds'), 5.0) == (
        'no batch from the loader workers for 5 s (data.limits.batch_timeout_s): a worker stopped responding')
    assert lifecycle.loader_fault(RuntimeError('DataLoader worker (pid(s) 12) exited unexpectedly'), 5.0) == (
        'a loader worker died (DataLoader worker (pid(s) 12) exited unexpectedly)')
    assert lifecycle.loader_fault(RuntimeError('CUDA out of memory'), 5.0) is None


def test_a_negative_batch_timeout_is_refused(tmp_path, demo_dir):
    with pytest.raises(ValueError) as e:
        train.train(smoke_config(demo_dir, **{'data.limits.batch_timeout_s': -1.0}), tmp_path / 'w')
    assert str(e.value) == 'config.data.limits.batch_timeout_s: must be >= 0, got -1.0'


# ---------------------------------------------------------------- TensorBoard on a full disk

def _full(*args, **kwargs):
    raise OSError(28, 'No space left on device')


@pytest.mark.parametrize('where', ['add_scalar', 'writer_thread'])
def test_tensorboard_on_a_full_disk_warns_once_and_training_goes_on(tmp_path, demo_dir, monkeypatch, capsys, where):
    """Every scalar write fails (or the writer's thread, whose error torch raises at a later write):
    one warning, all 6 steps trained, every checkpoint written. Before: OSError after step 3's
    checkpoint ended the run."""
    from tensorboard.summary.writer import record_writer
    from torch.utils.tensorboard import SummaryWriter
    if where == 'add_scalar':
        monkeypatch.setattr(SummaryWriter, 'add_scalar', _full)
    else:
        monkeypatch.setattr(record_writer.RecordWriter, 'flush', _full)
    train.train(smoke_config(demo_dir, **{'data.val_meta': ''}), tmp_path / 'w')
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith('warning: TensorBoard')]
    assert warnings == [f'warning: TensorBoard logging to {tmp_path / "w" / "tb"} stops here ([Errno 28] No space left '
                        f'on device); training goes on and checkpoints are still written']
    assert sorted(p.name for p in (tmp_path / 'w' / 'checkpoints').iterdir()) == ['last.pt', 'step_3.pt', 'step_6.pt']
    assert step_of(tmp_path / 'w' / 'checkpoints' / 'last.pt') == 6


# ---------------------------------------------------------------- the workdir

def workdir_fault(name, tmp_path):
    """(--workdir as given, what the message says after it) of one fault."""
    (tmp_path / 'file').write_text('x')
    work = tmp_path / 'run'
    if name == 'a_file':
        return tmp_path / 'file', 'a file, not a folder'
    if name == 'below_a_file':
        return tmp_path / 'file' / 'run', f'{tmp_path / "file"}: a file, not a folder'
    work.mkdir()
    if name in ('dangling_checkpoints', 'dangling_tb'):
        link = work / name.split('_')[1]
        link.symlink_to(tmp_path / 'gone')
        return work, f'{link}: a symbolic link to {tmp_path / "gone"}, which does not exist'
    (work / 'checkpoints').write_text('x')
    return work, f'{work / "checkpoints"}: a file, not a folder'


WORKDIR_FAULTS = ['a_file', 'below_a_file', 'dangling_checkpoints', 'dangling_tb', 'checkpoints_a_file']


@pytest.mark.parametrize('name', WORKDIR_FAULTS)
def test_a_workdir_the_run_cannot_use_is_refused_before_any_work(tmp_path, demo_dir, name):
    workdir, problem = workdir_fault(name, tmp_path)
    before = sorted(tmp_path.rglob('*'))
    with pytest.raises(ValueError) as e:
        train.train(smoke_config(demo_dir), str(workdir))
    assert str(e.value) == f'--workdir {workdir}: {problem}'
    assert sorted(tmp_path.rglob('*')) == before


def test_an_unwritable_workdir_is_refused_before_any_work(tmp_path, demo_dir, monkeypatch):
    """(As root, folder modes do not stop writes: the refusal of the file system is simulated.)"""
    import tempfile

    def refused(dir=None, **kwargs):
        raise PermissionError(13, 'Permission denied', str(dir))
    monkeypatch.setattr(tempfile, 'TemporaryFile', refused)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as e:
        train.train(smoke_config(demo_dir), 'relative/run')
    assert str(e.value) == '--workdir relative/run: cannot write relative/run: Permission denied'


def test_the_command_line_names_the_workdir_as_given(tmp_path, demo_dir):
    (tmp_path / 'file').write_text('x')
    res = run(['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(tmp_path / 'file'),
               *smoke_overrides(demo_dir)], timeout=300)
    assert res.returncode == 1 and res.stdout == ''
    assert res.stderr.splitlines() == [f'config error: --workdir {tmp_path / "file"}: a file, not a folder']
