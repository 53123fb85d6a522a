"""A step with a non-finite loss is skipped and changes nothing (weights, AdamW state, NN queue), also in a streak."""
import torch

import checkpoints
import trainstep
from configs import demo
from fault_runs import overrides
from helpers import run, scalars
from tiny_step import nonfinite_at


def test_a_skipped_step_changes_nothing_even_when_the_queue_wraps(monkeypatch):
    """train_step with a non-finite loss: parameters, AdamW state and every queue row stay as they
    were, also when the step's two pushes wrap around the end of the queue; the pointer moves.
    (BatchNorm running statistics are updated by the forward, before the loss is known.)"""
    from tools import bench
    cfg = demo.get_config('smoke')
    cfg.runtime.compile, cfg.loss.queue_size = 'false', 20          # batch 8: 8 EDA + 8 caption keys a step
    cpu = torch.device('cpu')
    state = trainstep.build_state(cfg, cpu)
    batch = bench._synthetic_batch(cfg, cfg.data.batch_size, cpu)
    nonfinite_at(monkeypatch, [False, True])   # the second step's loss is NaN
    assert float(trainstep.train_step(state, batch, cfg)['skipped']) == 0
    assert state.queue_ptr == 16
    before = {'queue': state.queue.clone(), 'model': {k: v.clone() for k, v in state.model.named_parameters()},
              'adam': [s['exp_avg'].clone() for s in state.optimizer.state.values()]}
    assert float(trainstep.train_step(state, batch, cfg)['skipped']) == 1
    assert state.queue_ptr == 8                             # 16 + 8 >= 20: restart at 0, then 0 + 8
    assert torch.equal(state.queue, before['queue'])
    assert all(torch.equal(v, before['model'][k]) for k, v in state.model.named_parameters())
    assert all(torch.equal(s['exp_avg'], a) for s, a in zip(state.optimizer.state.values(), before['adam']))
    assert int(state.nonfinite_total) == 1 and state.step == 2


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
