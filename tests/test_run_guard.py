"""Nothing lost, nothing hangs: unreadable checkpoints, a second run on one workdir, preemption
signals, a killed launcher, a failing evaluation, non-finite numbers, config drift at resume."""
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoints
import checks
import guard
import lifecycle
import train
import trainstep
from helpers import ROOT, free_port, run, smoke_config, smoke_overrides, step_of


# ---------------------------------------------------------------- 1, 15: checkpoint files

def test_unreadable_checkpoints_stop_the_run_unless_told_to_start_over(tmp_path, demo_dir):
    work, ckpts = tmp_path / 'w', tmp_path / 'w' / 'checkpoints'
    train.train(smoke_config(demo_dir, max_iter=2, keep_every=2), work)
    (ckpts / 'last.pt').write_bytes(b'torn')
    train.train(smoke_config(demo_dir, max_iter=3, keep_every=5), work)      # falls back to step_2.pt
    assert step_of(ckpts / 'last.pt') == 3
    for p in ckpts.glob('*.pt'):
        p.write_bytes(b'torn')
    with pytest.raises(RuntimeError, match='no readable checkpoint') as e:
        train.train(smoke_config(demo_dir, max_iter=4), work)
    assert 'last.pt' in str(e.value) and (ckpts / 'last.pt').read_bytes() == b'torn'
    train.train(smoke_config(demo_dir, max_iter=1), work, start_over=True)
    assert step_of(ckpts / 'last.pt') == 1 and (ckpts / 'last.pt.unreadable').read_bytes() == b'torn'


def test_foreign_files_in_checkpoints_are_left_alone(tmp_path, demo_dir):
    ckpts = tmp_path / 'checkpoints'
    ckpts.mkdir()
    (ckpts / 'step_best.pt').write_bytes(b'mine')
    train.train(smoke_config(demo_dir, max_iter=2, keep_every=1, keep_copies=1), tmp_path)
    assert (ckpts / 'step_best.pt').read_bytes() == b'mine' and step_of(ckpts / 'last.pt') == 2
    assert sorted(p.name for p in ckpts.glob('step_*.pt')) == ['step_2.pt', 'step_best.pt']
    torch.save({'step': 99}, tmp_path / 'other.pt')           # a torch file that is not a checkpoint
    with pytest.raises(RuntimeError, match='other.pt: not a training checkpoint'):
        checkpoints.load_checkpoint(tmp_path / 'other.pt')


# ---------------------------------------------------------------- 2: one run per workdir

def test_a_second_run_on_a_held_workdir_stops_naming_the_holder(tmp_path, demo_dir):
    work = tmp_path / 'w'
    (work / 'checkpoints').mkdir(parents=True)
    inflight = work / 'checkpoints' / 'last.pt.tmp'
    inflight.write_bytes(b'being written')
    with lifecycle.workdir_lock(work):
        res = run(['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(work), *smoke_overrides(demo_dir)])
    assert res.returncode != 0 and f'is in use by another run (pid {os.getpid()}' in res.stderr
    assert inflight.read_bytes() == b'being written'


# ---------------------------------------------------------------- 3, 4: signals, launcher death

def _start(work, demo_dir, nproc=1, script='train.py', **over):
    launcher = [sys.executable, script] if nproc == 1 else [
        sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc),
        '--master_port', str(free_port()), script]
    args = smoke_overrides(demo_dir, **{'max_iter': 500, 'ckpt_every': 400, 'data.val_meta': '', **over})
    return subprocess.Popen([*launcher, '--config', 'configs/demo.py:smoke', '--workdir', str(work), *args],
                            cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_step(proc, step):
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f'step {step}/'):
            return lines
    raise AssertionError('run ended early:\n' + ''.join(lines[-30:]))


def _processes_mentioning(text):
    found = []
    for d in Path('/proc').iterdir():
        try:
            if d.name.isdigit() and text in (d / 'cmdline').read_bytes().decode(errors='replace'):
                found.append(int(d.name))
        except OSError:
            pass
    return found


@pytest.mark.parametrize('nproc, sig', [(1, signal.SIGINT), (2, signal.SIGTERM)])
def test_a_signal_finishes_the_step_and_writes_a_checkpoint(tmp_path, demo_dir, nproc, sig):
    work = tmp_path / 'w'
    proc = _start(work, demo_dir, nproc, **{'data.workers': 1})   # a loader worker must not keep it alive
    try:
        _wait_for_step(proc, 3)
        proc.send_signal(sig)             # to the launcher: torchrun forwards it to its workers
        out = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode != 0 and 'the checkpoint is written' in out, out[-3000:]
    stopped = step_of(work / 'checkpoints' / 'last.pt')
    assert 3 <= stopped < 500 and f'stopped at step {stopped}' in out
    change = ['--allow_config_change'] if nproc > 1 else []     # resumed by one process: another global batch
    res = run(['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(work), *change,
               *smoke_overrides(demo_dir, **{'max_iter': stopped + 1, 'data.val_meta': ''})])
    assert res.returncode == 0 and f'at step {stopped}' in res.stderr, res.stderr[-3000:]


def test_a_second_signal_exits_at_once(tmp_path, demo_dir):
    """The second SIGTERM arrives while the stop's checkpoint write is held (tests/train_faults.py)."""
    os.environ['DECLIP_TEST_PAUSE_BEFORE_RENAME'] = '60'
    try:
        proc = _start(tmp_path / 'w', demo_dir, script='tests/train_faults.py')
    finally:
        del os.environ['DECLIP_TEST_PAUSE_BEFORE_RENAME']
    try:
        _wait_for_step(proc, 2)
        proc.send_signal(signal.SIGTERM)
        while not list((tmp_path / 'w' / 'checkpoints').glob('*.tmp')):
            assert proc.poll() is None
            time.sleep(0.05)
        start = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM and time.time() - start < 10


def test_workers_exit_when_their_launcher_is_killed(tmp_path, demo_dir):
    work = tmp_path / 'killed-launcher'
    proc = _start(work, demo_dir, nproc=2)
    try:
        _wait_for_step(proc, 2)
        assert len(_processes_mentioning(str(work))) >= 3       # launcher + 2 workers
        proc.kill()                                             # the launcher only: SIGKILL
        proc.wait()
        deadline = time.time() + 30
        while _processes_mentioning(str(work)) and time.time() < deadline:
            time.sleep(0.5)
        left = _processes_mentioning(str(work))
    finally:
        for pid in _processes_mentioning(str(work)):
            os.kill(pid, signal.SIGKILL)
        proc.stdout.close()
    assert not left


# ---------------------------------------------------------------- a failing run exits, loader workers too

STEP_FAILS = ('import runpy, sys, trainstep\n'
              'def failing(*args, **kwargs):\n'
              '    raise RuntimeError("injected step failure")\n'
              'trainstep.train_step = failing\n'
              'sys.argv = sys.argv[1:]\n'
              'runpy.run_path(sys.argv[0], run_name="__main__")\n')


def _failing_run(work, demo_dir, fault, workers):
    """(command, environment, what the output ends with) of a run that fails at its first step."""
    over = {'max_iter': 4, 'data.val_meta': '', 'data.workers': workers}
    env, entry = {**os.environ, 'OMP_NUM_THREADS': '1'}, ['train.py']
    if fault == 'bad_rate':       # every image but the first missing: the rate monitor stops the first batch
        meta = work.parent / 'missing.jsonl'
        meta.write_text('{"filename": "train_000000.jpg", "caption": "a cat"}\n'
                        + ''.join(f'{{"filename": "gone{i}.jpg", "caption": "a cat"}}\n' for i in range(39)))
        over.update({'data.train_meta': meta, 'data.limits.bad_window': 10, 'data.limits.max_bad_rate': 0.2})
        expected = 'could not be built'
    elif fault == 'diverged':
        env['DECLIP_TEST_NONFINITE_STEPS'] = '0'   # read by tests/train_faults.py, not by train.py
        entry = ['tests/train_faults.py']
        over['runtime.max_nonfinite'] = 1
        expected = '1 consecutive non-finite losses at step 1'
    else:
        entry = ['-c', STEP_FAILS, 'train.py']
        expected = 'injected step failure'
    args = [sys.executable, *entry, '--config', 'configs/demo.py:smoke', '--workdir', str(work),
            *smoke_overrides(demo_dir, **over)]
    return args, env, expected


@pytest.mark.parametrize('fault', ['bad_rate', 'diverged', 'step_error'])
def test_a_failing_run_with_loader_workers_exits(tmp_path, demo_dir, fault):
    """The data-rate stop, the divergence stop and an exception in the step each end the process,
    loader workers included, within seconds of the error (interpreter exit once waited forever on
    a worker that ignores SIGTERM). Runs with 1 and with 2 workers, side by side."""
    runs = []
    for workers in (1, 2):
        work = tmp_path / f'w{workers}'
        args, env, expected = _failing_run(work, demo_dir, fault, workers)
        runs.append((work, subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            text=True, start_new_session=True)))
    try:
        for work, proc in runs:
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if expected in line:
                    break
            assert any(expected in line for line in lines), ''.join(lines[-30:])
            assert proc.wait(timeout=30) != 0
            assert not _processes_mentioning(str(work))
    finally:
        for _, proc in runs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()


HOLDS_A_LOADER = ('import sys\n'
                  'import loader\n'
                  'from tests.helpers import data_config\n'
                  'cfg = data_config(train_root=sys.argv[1], train_meta=sys.argv[2], workers=2)\n'
                  'batches = iter(loader.build_train_loader(cfg, rank=0, world=1, start_step=0, max_iter=50))\n'
                  'next(batches)\n'
                  'print("holding a loader", flush=True)\n')


def test_a_process_that_still_holds_a_loader_at_exit_exits(tmp_path, demo_dir):
    """What kept a test process alive after its last test: a loader with workers still referenced
    at interpreter exit (here a module global; in a test, a traceback or a cycle)."""
    proc = subprocess.Popen([sys.executable, '-c', HOLDS_A_LOADER, str(demo_dir / 'train'),
                             str(demo_dir / 'train.jsonl')], cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out = proc.stdout.readline()
        code = proc.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert out == 'holding a loader\n' and code == 0


# ---------------------------------------------------------------- 5: evaluation never loses steps

def test_a_failing_evaluation_loses_no_steps_and_runs_again_on_resume(tmp_path, demo_dir, monkeypatch):
    cfg = smoke_config(demo_dir, max_iter=4, eval_every=2, ckpt_every=3)
    seen = []

    def failing(state, *args):
        seen.append(state.step)
        raise OSError('disk gone')
    monkeypatch.setattr(train, 'zero_shot', failing)
    with pytest.raises(OSError):
        train.train(cfg, tmp_path)
    assert seen == [2] and step_of(tmp_path / 'checkpoints' / 'last.pt') == 2   # saved before evaluating
    monkeypatch.setattr(train, 'zero_shot', lambda state, *a: seen.append(state.step) or
                        {'zeroshot_top1': 0.0, 'zeroshot_top5': 0.0, 'images': 0})
    train.train(cfg, tmp_path)
    assert seen == [2, 2, 4]               # the interrupted evaluation first, then the due one
    train.train(smoke_config(demo_dir, max_iter=5, eval_every=2, ckpt_every=3), tmp_path)
    assert seen == [2, 2, 4, 5]            # step 4's evaluation finished: not repeated; 5 is the last step


# ---------------------------------------------------------------- 6, 14: numbers and names first

@pytest.mark.parametrize('key, value, message', [
    ('optim.warmup_lr', float('nan'), 'config.optim.warmup_lr: must be a finite number'),
    ('optim.base_lr', -1e-4, 'config.optim.base_lr: must be >= 0'),
    ('data.batch_size', 0, 'config.data.batch_size: must be > 0'),
    ('optim.beta2', 1.0, 'config.optim.beta2: must be in [0, 1)'),
    ('max_iter', 0, 'config.max_iter: must be > 0'),
    ('model.embed_dim', 0, 'config.model.embed_dim: must be > 0'),
    ('model.checkpoint_image_stages', -1, 'config.model.checkpoint_image_stages: must be >= 0'),
    ('loss.nn', float('inf'), 'config.loss.nn: must be a finite number'),
    ('eval.prompts', 'prompt7', "config.eval.prompts: prompt set 'prompt7' not found"),
    ('data.val_root', '/nonexistent', 'config.data.val_root: folder not found'),
    ('data.limits.max_bad_rate', 1.01, 'config.data.limits.max_bad_rate: must be in [0, 1]'),
    ('model.act', 'relu', "config.model.act: one of quick_gelu, gelu, got 'relu'"),
])
def test_bad_values_fail_before_the_workdir_exists(tmp_path, demo_dir, key, value, message):
    cfg = smoke_config(demo_dir)
    section, _, leaf = key.rpartition('.')
    (cfg[section] if section else cfg)[leaf] = value
    with pytest.raises(ValueError, match=message.replace('[', r'\[').replace(')', r'\)')):
        train.train(cfg, tmp_path / 'w')
    assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('rate', [0.0, 1.0])
def test_bad_rate_limits_of_zero_and_one_are_accepted(demo_dir, rate):
    """max_bad_rate=1.0 never stops a run for bad samples (every attempt may fail: 100 % is not
    above 1.0); 0.0 stops it at the first full window with a failure."""
    cfg = smoke_config(demo_dir, **{'data.limits.max_bad_rate': rate})
    checks.check_numbers(cfg)
    monitor = guard.FailureMonitor(4, cfg.data.limits.max_bad_rate)
    for i in range(3):
        monitor.record(f'bad {i}')
    if rate == 1.0:
        for i in range(20):
            monitor.record(f'bad {i}')
    else:
        with pytest.raises(guard.DataError, match='100% of the last 4 samples'):
            monitor.record('bad 3')


@pytest.mark.parametrize('problem', ['other_folder', 'names_leave_the_folder'])
def test_an_evaluation_set_that_cannot_be_scored_fails_before_the_workdir_exists(tmp_path, demo_dir, problem):
    """Images that are not under data.val_root (another folder; filenames with '..', which are
    outside_root) would be skipped, every one, at the first evaluation: an error before any work."""
    over = {'data.val_root': demo_dir / 'train'}
    if problem == 'names_leave_the_folder':
        meta = tmp_path / 'val.jsonl'
        meta.write_text((demo_dir / 'val.jsonl').read_text().replace('"val_', '"../val/val_'))
        over = {'data.val_meta': meta}
    with pytest.raises(ValueError, match=r'config.data.val_meta / val_root: none of the first 60 images of .*val.jsonl'
                                         + (r".*outside_root: '\.\./val/val_000000.jpg'" if 'data.val_meta' in over else '')):
        train.train(smoke_config(demo_dir, **over), tmp_path / 'w')
    assert not (tmp_path / 'w').exists()


def test_an_empty_meta_file_fails_before_the_workdir_exists(tmp_path, demo_dir):
    (tmp_path / 'empty.jsonl').write_text('\n \r\n')
    with pytest.raises(ValueError, match='empty.jsonl has no samples'):
        train.train(smoke_config(demo_dir, **{'data.train_meta': tmp_path / 'empty.jsonl'}), tmp_path / 'w')
    assert not (tmp_path / 'w').exists()


def test_non_finite_weights_are_never_written(tmp_path, demo_dir):
    cfg = smoke_config(demo_dir)
    state = trainstep.build_state(cfg, torch.device('cpu'))
    with torch.no_grad():
        next(state.model.parameters())[0] = float('nan')
    (tmp_path / 'checkpoints').mkdir()
    with pytest.raises(SystemExit, match='weights are not finite'):
        checkpoints.save(state, cfg, tmp_path / 'checkpoints')
    assert not list((tmp_path / 'checkpoints').iterdir())


# ---------------------------------------------------------------- 11, 12: resuming

def test_resume_with_a_changed_config(tmp_path, demo_dir):
    train.train(smoke_config(demo_dir, max_iter=2), tmp_path)
    with pytest.raises(ValueError, match=r"data.batch_size: 8 -> 4") as e:
        train.train(smoke_config(demo_dir, max_iter=3, **{'data.batch_size': 4}), tmp_path)
    assert '--allow_config_change' in str(e.value) and 'max_iter' not in str(e.value)
    with pytest.raises(ValueError, match=r'model.vision_width: 128 -> 64'):   # another architecture
        train.train(smoke_config(demo_dir, max_iter=3, **{'model.vision_width': 64}), tmp_path)
    assert step_of(tmp_path / 'checkpoints' / 'last.pt') == 2
    train.train(smoke_config(demo_dir, max_iter=3, log_every=3), tmp_path)          # logging only: a warning
    train.train(smoke_config(demo_dir, max_iter=4, log_every=3, **{'data.batch_size': 4}), tmp_path,
                allow_config_change=True)
    assert step_of(tmp_path / 'checkpoints' / 'last.pt') == 4


def test_stop_at_at_or_below_the_resumed_step_says_so(tmp_path, demo_dir, capsys):
    train.train(smoke_config(demo_dir, max_iter=6, stop_at=2), tmp_path)
    capsys.readouterr()
    train.train(smoke_config(demo_dir, max_iter=6, stop_at=2), tmp_path)
    assert 'nothing to do: the run is at step 2 and this invocation ends at step 2' in capsys.readouterr().out
