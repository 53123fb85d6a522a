"""Interrupted runs resume exactly: kill -9 anywhere, 2-process stop and resume, the NN queues after a resume."""
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import checkpoints
from fault_runs import STEPS, command, overrides, run_and_kill
from helpers import QUEUE, ROOT, SMOKE, beside, queue_overrides, run, scalars, smoke_overrides, torchrun


def assert_checkpoints_readable(workdir):
    for path in (workdir / 'checkpoints').glob('*.pt'):
        state = checkpoints.safe_load(path)
        assert state['step'] > 0


@pytest.mark.parametrize('nproc, kills', [(1, 3), (2, 1)])   # 2 processes killed at a step: test_distributed
def test_kill9_anywhere_then_resume_gives_the_same_losses(tmp_path, demo_dir, nproc, kills):
    args = overrides(demo_dir)
    ref, crashed = tmp_path / 'ref', tmp_path / 'crashed'
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    rng = random.Random(nproc)
    steps = sorted(rng.sample(range(2, STEPS), kills - 1))
    plan = [('step', s) for s in steps]
    plan.insert(1, ('write', None))  # one kill while a checkpoint is half written
    with beside(command(ref, args, nproc), tmp_path / 'ref.log') as reference:
        for kind, step in plan:
            run_and_kill(crashed, args, nproc, at_step=step, during_write=kind == 'write')
            assert_checkpoints_readable(crashed)
        res = subprocess.run(command(crashed, args, nproc), cwd=ROOT, capture_output=True, text=True, env=env,
                             timeout=600)
    assert reference.returncode == 0, (tmp_path / 'ref.log').read_text()[-3000:]
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
    with beside([*args, '--workdir', 'ref'], tmp_path / 'ref.log', cwd=tmp_path, env=env) as reference:
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
    assert reference.returncode == 0, (tmp_path / 'ref.log').read_text()[-3000:]
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'resumed from' in res.stderr and 'step 1: zero-shot top-1' in res.stdout
    for tag in ('eval/zeroshot_top1', 'eval/zeroshot_top5', 'eval/images_skipped'):
        want, _ = scalars(tmp_path / 'ref', tag)
        got, _ = scalars(tmp_path / 'crashed', tag)
        assert sorted(want) == sorted(got) == [1, 2] and got == want, tag
    assert set(scalars(tmp_path / 'crashed', 'eval/images_skipped')[0].values()) == {0}


def test_two_process_run_logs_checkpoints_and_resumes_exactly(tmp_path, demo_dir, two_process_smoke):
    full, part = two_process_smoke['full'], tmp_path / 'part'
    losses_full, tags = scalars(full, 'loss/total')
    expected = {'loss/total', 'loss/clip', 'loss/nn', 'loss/simsiam', 'loss/mlm', 'train/lr', 'train/logit_scale',
                'train/grad_norm', 'perf/img_per_s', 'perf/img_per_s_per_device', 'perf/step_ms',
                'perf/data_wait_frac', 'mem/peak_gib', 'eval/zeroshot_top1', 'eval/zeroshot_top5'}
    expected |= {'samples/bad_total'}
    assert not [t for t in tags['scalars'] if t.startswith('data/')]
    assert expected <= set(tags['scalars'])
    assert {'views/0', 'views/1'} <= set(tags['images'])
    assert sorted(losses_full) == [1, 2, 3, 4, 5, 6]
    state = checkpoints.safe_load(full / 'checkpoints' / 'last.pt')
    assert state['step'] == 6 and len(state['queues']) == 2 and state['world_size'] == 2
    assert not torch.equal(state['queues'][0], state['queues'][1])
    # the same run stopped after 3 steps and resumed: identical per-step losses
    shutil.copytree(two_process_smoke['part'], part)
    res = torchrun(part, smoke_overrides(demo_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'resumed from' in res.stderr
    losses_part, _ = scalars(part, 'loss/total')
    for step in range(1, 7):
        assert losses_part[step] == pytest.approx(losses_full[step], rel=1e-6, abs=1e-6), step
    # continuing the 2-process run with one process halves the global batch: allowed only when asked
    res = run(['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(part), '--allow_config_change',
               *smoke_overrides(demo_dir, max_iter=8)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'global batch: 16 (2 processes x 1 micro-batches x 8) -> 8 (1 processes x 1 micro-batches x 8)' in res.stderr
    assert checkpoints.safe_load(part / 'checkpoints' / 'last.pt')['step'] == 8


def fifo_pointer(steps, size, n):
    """The reference's push rule: EDA keys then masked-caption keys, n rows each, per step; a push
    reaching or passing the end fills to the end, drops the rest and restarts at 0."""
    ptr = 0
    for _ in range(2 * steps):
        ptr = 0 if ptr + n >= size else ptr + n
    return ptr


def test_queues_and_pointer_after_resume_equal_the_uninterrupted_run(full_run, demo_dir, tmp_path):
    """Stop at step 3 and resume to 6: every rank's NN queue and the pointer equal the one-go run's."""
    n = SMOKE.data.batch_size
    assert 2 * SMOKE.max_iter * n > 2 * QUEUE  # the pointer wraps around (twice) during the run
    res = torchrun(tmp_path, queue_overrides(demo_dir, stop_at=3))
    assert res.returncode == 0, res.stderr[-3000:]
    mid = checkpoints.safe_load(tmp_path / 'checkpoints' / 'last.pt')
    assert mid['step'] == 3 and mid['queue_ptr'] == fifo_pointer(3, QUEUE, n)
    res = torchrun(tmp_path, queue_overrides(demo_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'resumed from' in res.stderr
    resumed = checkpoints.safe_load(tmp_path / 'checkpoints' / 'last.pt')
    full = checkpoints.safe_load(full_run / 'checkpoints' / 'last.pt')
    assert full['step'] == resumed['step'] == SMOKE.max_iter
    assert full['queue_ptr'] == resumed['queue_ptr'] == fifo_pointer(SMOKE.max_iter, QUEUE, n)
    assert len(full['queues']) == len(resumed['queues']) == 2
    for a, b in zip(full['queues'], resumed['queues']):
        assert a.shape[0] == QUEUE and torch.equal(a, b)
