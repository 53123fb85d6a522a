"""The smoke run's per-step losses are those recorded from the code before the module split and
the train_step rewrite (tests/fixtures/smoke_losses.json, 1 and 2 processes)."""
import json
from pathlib import Path

import pytest

from helpers import run, scalars, smoke_overrides, torchrun

FIXTURE = json.loads((Path(__file__).parent / 'fixtures' / 'smoke_losses.json').read_text())


@pytest.mark.parametrize('nproc', [1, 2])
def test_smoke_losses_equal_the_recorded_ones(tmp_path, demo_dir, nproc):
    if nproc == 1:
        res = run(['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(tmp_path),
                   *smoke_overrides(demo_dir)])
    else:
        res = torchrun(tmp_path, smoke_overrides(demo_dir), nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    for tag, expected in FIXTURE[str(nproc)].items():
        got, _ = scalars(tmp_path, tag)
        assert {str(k): v for k, v in got.items()} == pytest.approx(expected, rel=1e-6, abs=1e-6), tag
