"""bench.py runs end to end on CPU with tiny settings (a smoke test: figures are not asserted)."""
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
