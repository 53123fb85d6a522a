"""data.decode='device' through train.py gives the host path's losses; without torchvision it stops before any work."""
import sys

import pytest

from helpers import beside, run, scalars, smoke_overrides


FAKE_TORCHVISION_IO = """# stand-in for torchvision.io.decode_jpeg in tests (Pillow underneath)
import enum
import io

import numpy as np
import torch
from PIL import Image


class ImageReadMode(enum.Enum):
    RGB = 3


def decode_jpeg(blobs, mode=ImageReadMode.RGB, device='cpu'):
    images = [Image.open(io.BytesIO(bytes(b.numpy()))).convert('RGB') for b in blobs]
    return [torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).to(device) for im in images]
"""


def test_device_decode_run_equals_host_run(tmp_path, demo_dir):
    """data.decode='device' through train.py, torchvision replaced by a Pillow stand-in: the same
    crops of the same pixels, so the same losses as the host path (no draft reduction applies
    to the 80x80 demo images at 64 px)."""
    package = tmp_path / 'site' / 'torchvision'
    package.mkdir(parents=True)
    (package / '__init__.py').write_text('')
    (package / 'io.py').write_text(FAKE_TORCHVISION_IO)

    def args(mode):
        return ['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(tmp_path / mode),
                *smoke_overrides(demo_dir, stop_at=3, **{'data.decode': mode})]
    env = {'PYTHONPATH': str(tmp_path / 'site')}
    with beside([sys.executable, *args('host')], tmp_path / 'host.log', env=env) as host:
        res = run(args('device'), env=env)
    assert host.returncode == 0, (tmp_path / 'host.log').read_text()[-3000:]
    assert res.returncode == 0, res.stderr[-3000:]
    losses = {mode: scalars(tmp_path / mode, 'loss/total')[0] for mode in ('host', 'device')}
    assert sorted(losses['device']) == [1, 2, 3]
    for step in (1, 2, 3):
        assert losses['device'][step] == pytest.approx(losses['host'][step], rel=1e-6), step


def test_device_decode_without_torchvision_fails_before_work(tmp_path, demo_dir):
    res = run(['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(tmp_path),
               *smoke_overrides(demo_dir, **{'data.decode': 'device'})])
    assert res.returncode != 0 and "data.decode='device' needs torchvision" in res.stderr
    assert not (tmp_path / 'checkpoints').exists()
