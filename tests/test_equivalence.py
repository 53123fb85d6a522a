"""The smoke run's per-step losses are those recorded (tests/fixtures/smoke_losses.json, 1 and 2
processes). First recorded from the code before the module split and the train_step rewrite;
re-recorded when the first forward moved to the reference's logit scale ln(1/0.07) instead of the
clamped 3 (with only that change undone, the losses equalled the first recording), and re-recorded
when the demo corpus changed (large shapes, 80 px, new captions): recorded from the code of the
previous recording with only prepare.py's new corpus in it, after the same procedure had given the
previous numbers back with the old corpus. Re-recorded the same way when the demo corpus became grids
of mirror-symmetric shapes whose class is the shape: from code that had given the previous numbers
back (within this test's tolerance) with the old corpus, with only tools/demo.py's new corpus in it."""
import json
from pathlib import Path

import pytest

from helpers import run, scalars, smoke_overrides

FIXTURE = json.loads((Path(__file__).parent / 'fixtures' / 'smoke_losses.json').read_text())


@pytest.mark.parametrize('nproc', [1, 2])
def test_smoke_losses_equal_the_recorded_ones(tmp_path, demo_dir, nproc, request):
    if nproc == 1:
        res = run(['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(tmp_path),
                   *smoke_overrides(demo_dir)])
        assert res.returncode == 0, res.stderr[-3000:]
        workdir = tmp_path
    else:   # the suite's shared 2-process smoke run (conftest.py): the same command
        workdir = request.getfixturevalue('two_process_smoke')['full']
    for tag, expected in FIXTURE[str(nproc)].items():
        got, _ = scalars(workdir, tag)
        assert {str(k): v for k, v in got.items()} == pytest.approx(expected, rel=1e-6, abs=1e-6), tag
