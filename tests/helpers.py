"""Shared test fixtures: tiny model configs and a 2-process gloo launcher."""
import os
import socket

import ml_collections
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from configs import common


def tiny_config(vision='vit', declip=True):
    """A few-thousand-parameter DeCLIP/CLIP (real vocabulary so MLM random ids stay valid)."""
    c = common.base_config(common.ViT_B32 if vision == 'vit' else common.R50, declip=declip)
    small = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2,
                 embed_dim=16, context_length=16, text_width=32, text_layers=2, text_heads=2,
                 simsiam_dim=32, predictor_dim=16)
    if vision == 'resnet':
        small.update(vision_width=8, vision_layers=(1, 1, 1, 1), vision_heads=2)
    c.model.update(small)
    c.loss.queue_size = 64
    return c


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run_distributed(fn, world, *args):
    """Run fn(rank, world, *args) in `world` gloo processes; raises if any fails."""
    torch.set_num_threads(1)
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True,
                       start_method='spawn')


def as_dict(cfg):
    return ml_collections.ConfigDict(cfg).to_dict()


def data_config(tmp_path=None, **overrides):
    """The data block of a DeCLIP config, small and single-process, with overrides."""
    c = common.base_config(common.ViT_B32).data
    c.update(dict(image_size=32, batch_size=4, workers=0, bad_window=20, max_bad_rate=0.5))
    c.update(overrides)
    return c


def write_jpeg(path, size=(64, 48), color=(200, 30, 30), seed=0):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    arr = (np.array(color) + rng.integers(-20, 20, (size[1], size[0], 3))).clip(0, 255).astype('uint8')
    Image.fromarray(arr).save(path, format='JPEG')
