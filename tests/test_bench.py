"""bench.py runs end to end on CPU with tiny settings (speed figures are not asserted; the
bf16-against-fp32 check is)."""
import json

import bench
from helpers import write_jpeg


def test_bench_modes_smoke(tmp_path):
    for i in range(4):
        write_jpeg(tmp_path / f'{i}.jpg', size=(120, 90), seed=i)
    out = tmp_path / 'out.json'
    r = bench.main(['data', '--images', str(tmp_path), '--seconds', '0.05', '--device-pairs', '2',
                    '--index-lines', '1000', '--out', str(out)])
    assert r['index']['lines'] == 1000 and r['cpu_part_pairs_per_s_core'] > 0
    assert json.loads(out.read_text())['mode'] == 'data'
    r = bench.main(['step', '--config', 'configs/demo.py:smoke', '--batch', '4', '--warmup', '1', '--steps', '1',
                    '--matmul-n', '64', '--out', str(out)])
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
    assert len(r['parts']) == 6 and all(p['before_ms'] > 0 and p['after_ms'] > 0 for p in r['parts'].values())
    r = bench.main(['precision', '--config', 'configs/demo.py:smoke', '--batch', '4', '--steps', '3',
                    '--compare', '3', '--out', str(out)])
    assert r['finite'] and r['ok'] and 0 < r['max_rel_diff'] < 0.02  # bf16 autocast really ran
    assert len(r['losses']['fp32']) == len(r['losses']['bf16']) == 3

