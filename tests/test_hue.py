"""The device hue op against Pillow on every colour class, and in the dtypes Ascend runs on its AI cores."""
import functools

import numpy as np
import torch
from PIL import Image

import images
from helpers import DtypeRecorder
from tools import bench_data


@functools.cache
def _class_colours():
    """Pillow's H depends only on max - r, max - g, max - b (colours with a channel at 255 hold
    every case), its S on (max, min) (colours (max, min, min)): [3, n] as integer floats."""
    a, b = (t.flatten() for t in torch.meshgrid(torch.arange(256), torch.arange(256), indexing='ij'))
    top = torch.full_like(a, 255)
    lo, hi = torch.triu_indices(256, 256)
    return torch.cat([torch.stack([top, a, b]), torch.stack([a, top, b]), torch.stack([a, b, top]),
                      torch.stack([lo, hi, hi])], dim=1).float()


def _pil(mode, planes, to):
    """Pillow's conversion of 8-bit planes [3, n] from `mode` to `to`, as a [3, n] tensor."""
    arr = planes.T.contiguous().to(torch.uint8).numpy()[None]
    return torch.from_numpy(np.asarray(Image.fromarray(arr, mode).convert(to)).copy())[0].T.float()


def test_hsv_equals_pillow_on_every_colour_class():
    rgb = _class_colours()
    h, s, v = images._hsv8(rgb[None])
    want = _pil('RGB', rgb, 'HSV')
    assert torch.equal(s[0], want[1]) and torch.equal(v[0], want[2])
    coloured = want[1] > 0        # S = 0 makes H irrelevant (Pillow stores 0)
    assert torch.equal(h[0][coloured], want[0][coloured])


def test_hsv_to_rgb_equals_pillow():
    """Every (H, S) pair at 16 values of V from 0 to 255."""
    h, s, v = torch.meshgrid(torch.arange(256.), torch.arange(256.), torch.arange(0., 256, 17), indexing='ij')
    hsv = torch.stack([h.flatten(), s.flatten(), v.flatten()])
    assert torch.equal(images._rgb8(*hsv[:, None, :, None].unbind(0))[0, :, :, 0], _pil('HSV', hsv, 'RGB'))


def test_adjust_hue_equals_pillow():
    """torchvision's PIL hue op (H += trunc(255 * shift), uint8 wrap-around) at shifts of both signs."""
    rgb = _class_colours()
    shifts = [-0.5, -0.1, -0.013, 0.0, 0.004, 0.1, 0.499]
    got = images.adjust_hue((rgb / 255).expand(len(shifts), 3, -1)[..., None], torch.tensor(shifts))
    img = Image.fromarray(rgb.T.contiguous().to(torch.uint8).numpy()[None], 'RGB')
    for k, shift in enumerate(shifts):
        want = torch.from_numpy(np.asarray(bench_data.pil_hue(img, shift)).copy())[0].T.float()
        assert torch.equal(torch.round(got[k, :, :, 0] * 255), want), shift


def test_adjust_hue_runs_in_float32_and_bool_only():
    """Ascend runs int64 arithmetic and casts on its AI CPU and has no float64: every tensor the op
    makes is float32 or bool."""
    x = torch.rand(4, 3, 8, 8)
    with DtypeRecorder() as mode:
        images.adjust_hue(x, torch.tensor([-0.1, 0.0, 0.05, 0.1]))
    assert set(mode.seen) <= {torch.float32, torch.bool}, mode.seen
