"""The colour ops of a training step (moco_v2) come from the stream of (config.seed, step, rank):
generator index step * world + rank, one stream per virtual device and step, so no two devices or
steps share their jitter, grayscale and blur draws, and a resumed run redraws the same ones."""
import pytest
import torch

import seeds
import images
import trainstep
from helpers import tiny_config
from tiny_step import one_thread  # noqa: F401  (a fixture)
from tools import bench

CPU = torch.device('cpu')
pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.mark.parametrize('step, rank, world', [(1, 0, 2), (3, 2, 4), (2, 0, 1)])
def test_views_are_augmented_from_the_step_and_rank_stream(step, rank, world):
    """device_views equals device_augment over the batch's views in (sample, view) order with
    seeds.generator(seed, step * world + rank). Breaks it catches: the stream index step + rank
    (step 1 of rank 0 would redraw step 0 of rank 1), the run's seed left out, the views taken
    in (view, sample) order."""
    cfg = tiny_config()
    cfg.seed = 5
    batch = bench._synthetic_batch(cfg, 4, CPU)
    got = trainstep.device_views(batch, cfg=cfg, step=step, rank=rank, world=world, device=CPU)
    views = batch['images']
    want = images.device_augment(views.flatten(0, 1), generator=seeds.generator(5, step * world + rank))
    assert 'jpeg' not in batch   # host views: nothing left undecoded
    torch.testing.assert_close(got, want.view(views.shape), rtol=0, atol=0)


def test_two_devices_and_two_steps_draw_different_colour_ops():
    """Rank 1 at step 0 and rank 0 at step 1 of a 2-process run see other colour ops on the same
    views (and the same ones again when asked twice)."""
    cfg = tiny_config()
    batch = bench._synthetic_batch(cfg, 4, CPU)
    a = trainstep.device_views(batch, cfg=cfg, step=0, rank=1, world=2, device=CPU)
    b = trainstep.device_views(batch, cfg=cfg, step=1, rank=0, world=2, device=CPU)
    again = trainstep.device_views(batch, cfg=cfg, step=0, rank=1, world=2, device=CPU)
    assert torch.equal(a, again) and not torch.equal(a, b)
