"""Shared test helpers: tiny models and configs, smoke runs and their logs, small corpora, a gloo launcher."""
import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import ml_collections
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

import declip
import guard
import loader
from configs import common, demo

SMOKE = demo.get_config('smoke')
QUEUE = 40  # 2 x 8 keys pushed per step: the pointer wraps during steps 3 and 5 of 6


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
    """The data block of a DeCLIP config, small and single-process, with overrides (a key of
    data.limits, e.g. bad_window, goes there)."""
    c = common.base_config(common.ViT_B32).data
    c.update(dict(image_size=32, batch_size=4, workers=0))
    c.limits.update(dict(bad_window=20, max_bad_rate=0.5))
    c.limits.update({k: v for k, v in overrides.items() if k in c.limits})
    c.update({k: v for k, v in overrides.items() if k not in c.limits})
    return c


def write_jpeg(path, size=(64, 48), color=(200, 30, 30), seed=0):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    arr = (np.array(color) + rng.integers(-20, 20, (size[1], size[0], 3))).clip(0, 255).astype('uint8')
    Image.fromarray(arr).save(path, format='JPEG')


ROOT = Path(__file__).resolve().parents[1]


def one_thread_env(env=None):
    """This process's environment, one thread per process, with `env` on top."""
    return {**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})}


def run(args, env=None, timeout=600):
    """A repository script in a subprocess (one thread), captured."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env=one_thread_env(env), timeout=timeout)


def smoke_overrides(demo_dir, **extra):
    o = {'data.train_root': demo_dir / 'train', 'data.train_meta': demo_dir / 'train.jsonl',
         'data.val_root': demo_dir / 'val', 'data.val_meta': demo_dir / 'val.jsonl',
         'data.shards': demo_dir / 'shards' / '*.tar', 'log_every': 1, **extra}
    return [f'--config.{k}={v}' for k, v in o.items()]


def smoke_config(demo_dir, **over):
    """The demo smoke config on the test corpus, for train.train in this process: no compile;
    `over`: dotted keys as smoke_overrides takes them."""
    cfg = demo.get_config('smoke')
    cfg.runtime.compile = 'false'
    for arg in smoke_overrides(demo_dir, **over):
        key, value = arg[len('--config.'):].split('=', 1)
        *parents, leaf = key.split('.')
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value if node[leaf] is None or isinstance(node[leaf], str) else type(node[leaf])(value)
    return cfg


def torchrun(workdir, overrides, nproc=2, env=None):
    return run(['-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--master_port', str(free_port()),
                'train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(workdir), *overrides], env=env)


def scalars(workdir, tag):
    """{step: value} of a TensorBoard scalar and all tags of a run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(Path(workdir) / 'tb'), size_guidance={'scalars': 0, 'images': 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}, acc.Tags()



def tiny_model():
    """The smoke config's model, seed 0, in eval mode."""
    torch.manual_seed(0)
    return declip.build_model(SMOKE.model).eval()


def queue_overrides(demo_dir, **extra):
    """smoke_overrides with an NN queue of QUEUE rows."""
    return smoke_overrides(demo_dir, **{'loss.queue_size': QUEUE, **extra})


def bad_totals(batches):
    """{kind: count} of the bad samples of these batches, kinds that occurred only."""
    total = sum(b['bad'] for b in batches)
    return {k: n for k, n in zip(guard.BAD_KINDS, total.tolist()) if n}


def write_meta(path, records):
    """A JSON Lines meta file of these records; its path."""
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    return path


def one_pass(cfg, n):
    """Every sample of the first n positions of a single-rank loader, as batches."""
    return list(loader.build_train_loader(cfg, rank=0, world=1, start_step=0, max_iter=n // cfg.batch_size))


def write_half_missing_corpus(folder, n=40):
    """A meta file of n captions whose every other image is missing (a 50 %-bad corpus)."""
    lines = []
    for i in range(n):
        if i % 2:
            write_jpeg(Path(folder) / f'{i}.jpg', seed=i)
        lines.append(json.dumps({'filename': f'{i}.jpg', 'caption': 'a cat'}))
    (Path(folder) / 'meta.jsonl').write_text('\n'.join(lines))


class DtypeRecorder(TorchDispatchMode):
    """Records the dtype of every tensor an op makes while active: `seen` maps dtype -> first op."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.seen.setdefault(t.dtype, str(func))
        return out


@contextlib.contextmanager
def beside(cmd, log, *, cwd=ROOT, env=None):
    """Run `cmd` (one thread, `env` on top; output to the file `log`) while the block runs, and wait
    for it at the block's end: a one-process reference run takes the core a one-process run under
    test leaves idle. Yields the process (its returncode is set after the block); killed if the
    block fails."""
    with open(log, 'w') as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=one_thread_env(env), stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
            proc.wait(timeout=600)
        finally:
            proc.kill()
            proc.wait()


def step_of(path):
    """The step a checkpoint file holds."""
    import checkpoints
    return checkpoints.safe_load(path)['step']


@contextlib.contextmanager
def captured_graphs(monkeypatch):
    """torch.compile under dynamo's plain backend (the capture tested, not inductor's code): yields
    the list of each captured graph's source lines; dynamo and trainstep's compiled functions are
    fresh on entry and on exit."""
    import trainstep
    graphs, compile_ = [], torch.compile

    def backend(gm, example_inputs):
        graphs.append('\n'.join(node.meta.get('stack_trace') or '' for node in gm.graph.nodes))
        return gm.forward
    monkeypatch.setattr(torch, 'compile', lambda fn, **kw: compile_(fn, backend=backend, **kw))

    def fresh():
        torch._dynamo.reset()
        trainstep.compiled.cache_clear()
    fresh()
    try:
        yield graphs
    finally:
        fresh()
