"""tools/bench.py runs end to end on CPU with tiny settings (speed figures are not asserted; the
bf16-against-fp32 check is), and its step is the training loop's step."""
import itertools
import json

import pytest
import torch

import configs.demo
import guard
import loader
import runtime
import train
from helpers import scalars, write_jpeg
from tools import bench


def test_bench_modes_smoke(tmp_path):
    for i in range(4):
        write_jpeg(tmp_path / f'{i}.jpg', size=(120, 90), seed=i)
    out = tmp_path / 'out.json'
    r = bench.main(['data', '--images', str(tmp_path), '--seconds', '0.05', '--device_pairs', '2',
                    '--index_lines', '1000', '--out', str(out)])
    assert r['index']['lines'] == 1000 and r['cpu_part_pairs_per_s_core'] > 0
    assert json.loads(out.read_text())['mode'] == 'data'
    r = bench.main(['step', '--config', 'configs/demo.py:smoke', '--batch', '4', '--warmup', '1', '--steps', '1',
                    '--matmul_n', '64', '--out', str(out)])
    assert r['flops_per_step'] > 0 and r['img_per_s'] > 0 and 0 < r['mfu']
    r = bench.main(['e2e', '--config', 'configs/demo.py:smoke', '--images', str(tmp_path), '--workers', '0',
                    '--batch', '2', '--size', '32', '--warmup', '1', '--steps', '2', '--out', str(out)])
    assert r['pairs_per_s'] > 0 and 0 <= r['data_wait_frac'] <= 1
    r = bench.main(['e2e', '--config', 'configs/demo.py:smoke', '--images', str(tmp_path), '--workers', '0',
                    '--batch', '2', '--size', '32', '--warmup', '1', '--steps', '2', '--decode', 'device',
                    '--out', str(out)])
    assert r['decode'] == 'device' and r['pairs_per_s'] > 0


def test_bench_parts_and_precision(tmp_path):
    out = tmp_path / 'out.json'
    r = bench.main(['parts', '--config', 'configs/demo.py:smoke', '--batch', '4', '--rounds', '1', '--out', str(out)])
    assert len(r['parts']) == 7 and all(p['before_ms'] > 0 and p['after_ms'] > 0 for p in r['parts'].values())
    r = bench.main(['precision', '--config', 'configs/demo.py:smoke', '--batch', '4', '--steps', '3',
                    '--compare', '3', '--out', str(out)])
    assert r['finite'] and r['ok'] and 0 < r['max_rel_diff'] < 0.02  # bf16 autocast really ran
    assert len(r['losses']['fp32']) == len(r['losses']['bf16']) == 3


def test_bench_step_is_the_training_step(tmp_path, monkeypatch):
    """The step `bench.py step` times and train.train's loop give the same losses, step after step,
    on the same synthetic batch (fp32 on CPU): the benchmark cannot drift from the loop again."""
    cfg = configs.demo.get_config('smoke')
    (tmp_path / 'train.jsonl').write_text(json.dumps({'filename': 'x.jpg', 'caption': 'a cat'}) + '\n')
    write_jpeg(tmp_path / 'x.jpg')  # the pre-flight check reads the first images
    cfg.data.update(dict(train_meta=str(tmp_path / 'train.jsonl'), train_root=str(tmp_path), val_meta=''))
    cfg.update(dict(log_every=1, max_iter=3))
    cfg.runtime.update(dict(precision='fp32', compile='false'))
    batch = bench._synthetic_batch(cfg, cfg.data.batch_size, torch.device('cpu'))
    batch['bad'] = torch.zeros(len(guard.BAD_KINDS), dtype=torch.long)
    step = bench.trainer(cfg, torch.device('cpu'))
    bench_losses = [float(step(batch)) for _ in range(3)]

    monkeypatch.setattr(loader, 'build_train_loader', lambda *a, **k: itertools.repeat(batch))
    monkeypatch.setattr(runtime, 'setup_device', lambda *a: (torch.device('cpu'), 'cpu'))  # on any machine
    train.train(cfg, tmp_path / 'run')
    logged, _ = scalars(tmp_path / 'run', 'loss/total')
    assert [logged[t] for t in (1, 2, 3)] == pytest.approx(bench_losses, rel=1e-6)
    assert len(set(bench_losses)) == 3   # the steps really differ (weights, LR, augmentation)
