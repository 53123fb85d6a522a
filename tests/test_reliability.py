"""Fault injection: kill -9 and resume, bad corpora, non-finite losses, rank death, config errors."""
import checkpoints
import os
import random
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from helpers import ROOT, free_port, run, scalars, smoke_overrides, write_half_missing_corpus
from test_bad_inputs import build_bad_corpus

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


def assert_checkpoints_readable(workdir):
    for path in (workdir / 'checkpoints').glob('*.pt'):
        state = checkpoints.safe_load(path)
        assert state['step'] > 0


@pytest.mark.parametrize('nproc, kills', [(1, 3), (2, 1)])   # 2 processes killed at a step: test_distributed
def test_kill9_anywhere_then_resume_gives_the_same_losses(tmp_path, demo_dir, nproc, kills):
    args = overrides(demo_dir)
    ref, crashed = tmp_path / 'ref', tmp_path / 'crashed'
    res = subprocess.run(command(ref, args, nproc), cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rng = random.Random(nproc)
    steps = sorted(rng.sample(range(2, STEPS), kills - 1))
    plan = [('step', s) for s in steps]
    plan.insert(1, ('write', None))  # one kill while a checkpoint is half written
    for kind, step in plan:
        run_and_kill(crashed, args, nproc, at_step=step, during_write=kind == 'write')
        assert_checkpoints_readable(crashed)
    res = subprocess.run(command(crashed, args, nproc), cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    want, _ = scalars(ref, 'loss/total')
    got, _ = scalars(crashed, 'loss/total')
    assert sorted(want) == sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step
    kept = sorted(p.name for p in (crashed / 'checkpoints').glob('step_*.pt'))
    assert kept == ['step_10.pt', 'step_8.pt'] and not list((crashed / 'checkpoints').glob('*.tmp'))
    assert_checkpoints_readable(crashed)


PAUSES_IN_EVALUATION = ('import os, runpy, sys, time, evaluate\n'
                        'get = evaluate.EvalDataset.__getitem__\n'
                        'def paused(self, i):\n'
                        '    if os.environ.get("PAUSE_IN_EVALUATION"):\n'
                        '        print("evaluating", flush=True)\n'
                        '        time.sleep(120)\n'
                        '    return get(self, i)\n'
                        'evaluate.EvalDataset.__getitem__ = paused\n'
                        'sys.argv = sys.argv[1:]\n'
                        'runpy.run_path(sys.argv[0], run_name="__main__")\n')


def test_kill9_during_evaluation_then_resume_gives_the_same_numbers(tmp_path, demo_dir):
    """A run killed in its in-run evaluation and relaunched with the same command (data through a
    symlink, paths relative to a working directory that is not the code's) evaluates again on
    resume: every image scored, the numbers of a run that was never interrupted."""
    (tmp_path / 'corpus').symlink_to(demo_dir)
    args = [sys.executable, '-c', PAUSES_IN_EVALUATION, str(ROOT / 'train.py'), '--config',
            f'{ROOT}/configs/demo.py:smoke', '--config.max_iter=2', '--config.eval_every=1', '--config.log_every=1',
            *[f'--config.data.{k}=corpus/{v}' for k, v in (('train_root', 'train'), ('train_meta', 'train.jsonl'),
                                                          ('val_root', 'val'), ('val_meta', 'val.jsonl'))]]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
    res = subprocess.run([*args, '--workdir', 'ref'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    proc = subprocess.Popen([*args, '--workdir', 'crashed'], cwd=tmp_path, env={**env, 'PAUSE_IN_EVALUATION': '1'},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert any(line.startswith('evaluating') for line in proc.stdout)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert checkpoints.safe_load(tmp_path / 'crashed' / 'checkpoints' / 'last.pt')['step'] == 1
    res = subprocess.run([*args, '--workdir', 'crashed'], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'resumed from' in res.stderr and 'step 1: zero-shot top-1' in res.stdout
    for tag in ('eval/zeroshot_top1', 'eval/zeroshot_top5', 'eval/images_skipped'):
        want, _ = scalars(tmp_path / 'ref', tag)
        got, _ = scalars(tmp_path / 'crashed', tag)
        assert sorted(want) == sorted(got) == [1, 2] and got == want, tag
    assert set(scalars(tmp_path / 'crashed', 'eval/images_skipped')[0].values()) == {0}


def test_bad_corpus_trains_through_and_counts_every_kind(tmp_path):
    root = tmp_path / 'corpus'
    root.mkdir()
    kinds = {k for k in build_bad_corpus(root) if k}
    res = run(['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(tmp_path / 'run'),
               f'--config.data.train_root={root}', f'--config.data.train_meta={root / "meta.jsonl"}',
               '--config.data.val_meta=', '--config.log_every=1', '--config.max_iter=12',
               '--config.data.limits.bad_window=1000'])
    assert res.returncode == 0, res.stderr[-3000:]
    for kind in kinds:
        counts, _ = scalars(tmp_path / 'run', f'samples/{kind}')
        assert counts[12] > 0, kind
    _, tags = scalars(tmp_path / 'run', 'samples/bad_total')
    assert 'samples/other' not in tags['scalars']   # a kind is logged once it occurs


def test_broken_shards_train_through(tmp_path, demo_dir):
    shards = tmp_path / 'shards'
    shards.mkdir()
    good = (demo_dir / 'shards' / 'demo-000000.tar').read_bytes()
    (shards / 'a.tar').write_bytes(good[:len(good) // 20])      # a dozen samples, then cut mid-member
    with tarfile.open(shards / 'b.tar', 'w') as out, tarfile.open(demo_dir / 'shards' / 'demo-000000.tar') as src:
        for member in src.getmembers()[:12]:                     # 4 samples; the last one lacks its .txt
            if member.name != src.getmembers()[11].name or not member.name.endswith('.txt'):
                out.addfile(member, src.extractfile(member))
    res = run(['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(tmp_path / 'run'),
               '--config.data.format=wds', f'--config.data.shards={shards}/*.tar', '--config.data.val_meta=',
               '--config.log_every=1', '--config.data.limits.bad_window=1000'])
    assert res.returncode == 0, res.stderr[-3000:]
    counts, _ = scalars(tmp_path / 'run', 'samples/bad_tar')
    assert max(counts.values()) > 0


def test_mostly_bad_corpus_stops_with_a_clear_message(tmp_path):
    write_half_missing_corpus(tmp_path)
    res = run(['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(tmp_path / 'run'),
               f'--config.data.train_root={tmp_path}', f'--config.data.train_meta={tmp_path / "meta.jsonl"}',
               '--config.data.val_meta=', '--config.data.limits.bad_window=20', '--config.data.limits.max_bad_rate=0.2'])
    assert res.returncode != 0
    assert 'could not be built' in res.stderr and 'missing:' in res.stderr and '.jpg' in res.stderr


def _params(state):
    buffers = ('running_mean', 'running_var', 'num_batches_tracked')
    return {k: v for k, v in state['model'].items() if not k.endswith(buffers)}


def test_nonfinite_step_changes_nothing_and_is_logged(tmp_path, demo_dir):
    args = overrides(demo_dir, max_iter=6, ckpt_every=1, keep_every=1, keep_copies=0)
    res = run(['tests/train_faults.py', '--config', 'configs/demo.py:smoke', '--workdir', str(tmp_path), *args],
              env={'DECLIP_TEST_NONFINITE_STEPS': '2'})  # 0-based step 2 = the third step
    assert res.returncode == 0, res.stderr[-3000:]
    before = checkpoints.safe_load(tmp_path / 'checkpoints' / 'step_2.pt')
    after = checkpoints.safe_load(tmp_path / 'checkpoints' / 'step_3.pt')
    for name, value in _params(before).items():
        assert torch.equal(value, after['model'][name]), name
    for pid, st in before['optimizer']['state'].items():
        for key, value in st.items():
            assert torch.equal(value, after['optimizer']['state'][pid][key]), (pid, key)
    torch.testing.assert_close(before['queues'][0], after['queues'][0])
    nonfinite, _ = scalars(tmp_path, 'train/nonfinite_steps')
    assert nonfinite[2] == 0 and nonfinite[3] == 1 and nonfinite[4] == 1
    losses, _ = scalars(tmp_path, 'loss/total')
    assert 3 not in losses and {1, 2, 4} <= set(losses)
    final = checkpoints.safe_load(tmp_path / 'checkpoints' / 'step_4.pt')
    assert any(not torch.equal(v, final['model'][k]) for k, v in _params(after).items())


def test_nonfinite_streak_stops_cleanly_keeping_the_last_good_checkpoint(tmp_path, demo_dir):
    args = overrides(demo_dir, max_iter=8, ckpt_every=2, keep_every=2, keep_copies=0, **{'runtime.max_nonfinite': 3})
    res = run(['tests/train_faults.py', '--config', 'configs/demo.py:smoke', '--workdir', str(tmp_path), *args],
              env={'DECLIP_TEST_NONFINITE_STEPS': '2,3,4,5,6'})   # 1-based steps 3-7
    assert res.returncode != 0
    assert '3 consecutive non-finite losses at step 5' in res.stderr + res.stdout
    last = checkpoints.safe_load(tmp_path / 'checkpoints' / 'last.pt')
    good = checkpoints.safe_load(tmp_path / 'checkpoints' / 'step_2.pt')
    assert last['step'] == 4   # written during the streak: identical weights to the last good step
    for name, value in _params(good).items():
        assert torch.equal(value, last['model'][name]), name


def test_a_dead_rank_does_not_hang_the_other(tmp_path, demo_dir):
    port = free_port()
    procs = []
    args = overrides(demo_dir, max_iter=400, **{'runtime.dist_timeout_s': 30})
    for rank in range(2):
        env = {**os.environ, 'OMP_NUM_THREADS': '1', 'RANK': str(rank), 'LOCAL_RANK': str(rank), 'WORLD_SIZE': '2',
               'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port)}
        procs.append(subprocess.Popen([sys.executable, 'train.py', '--config', 'configs/demo.py:smoke',
                                       '--workdir', str(tmp_path), *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for line in procs[0].stdout:
        if line.startswith('step 3/'):
            break
    procs[1].kill()
    start = time.time()
    try:
        code = procs[0].wait(timeout=120)
    finally:
        for p in procs:
            p.kill()
            p.wait()
            p.stdout.close()
    assert code != 0 and time.time() - start < 120


@pytest.mark.parametrize('override, message', [
    ('--config.optim.warmup_lrr=1', 'warmup_lrr'),
    ('--config.max_iter=abc', 'max_iter'),
    ('--config.data.train_meta=/nonexistent/meta.jsonl', 'config.data.train_meta: file not found'),
    ('--config.data.bpe_path=/nonexistent/bpe.txt.gz', 'config.data.bpe_path: file not found'),
])
def test_config_errors_fail_before_any_work(tmp_path, demo_dir, override, message):
    workdir = tmp_path / 'run'
    res = run(['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(workdir),
               *smoke_overrides(demo_dir), override], timeout=120)
    assert res.returncode != 0 and message in res.stderr
    assert not workdir.exists()
