"""The training loader: the data core (data.py) behind the guard (guard.py: bounded reads, confined
paths, timeouts, replaced bad samples), webdataset shards (shards.py), device JPEG decode (jpeg.py)
and loader workers that end with the run (lifecycle.py)."""
import torch

import data
import guard
import jpeg
import lifecycle
import shards


def sample_builder(cfg):
    """The builder of training samples: opens images under data.limits, and with
    data.decode='device' leaves the JPEGs the device can take to it."""
    return (jpeg.DeviceBuilder if cfg.decode == 'device' else guard.GuardedBuilder)(cfg)


def train_dataset(cfg):
    """The guarded JSON Lines training set (its meta files indexed), or None for shards
    (ShardStream is built per rank by the loader)."""
    if cfg.format != 'jsonl':
        return None
    return guard.GuardedDataset(guard.guarded_pairs(cfg, sample_builder(cfg)), cfg.limits)


def data_identity(cfg, dataset):
    """What defines the training data, for a checkpoint to compare on resume, cheaply at 15 M
    records: JSON Lines: the record count and the metas' sha256 (taken while indexing); shards:
    their count and a sha256 of their sorted names and sizes (no shard is read)."""
    if dataset is not None:
        return {'format': 'jsonl', 'records': len(dataset), 'sha256': dataset.dataset.meta.sha256}
    return shards.shard_identity(shards.shard_paths(cfg.shards))


class Collate(data.Collate):
    """data.Collate, plus the batch's bad-sample counts by kind and, with device decode, its JPEGs
    (the samples decoded on the host bring views, the others none)."""

    def __call__(self, samples):
        return {**super().__call__(samples), 'bad': torch.stack([s['bad'] for s in samples]).sum(0)}

    def views(self, samples):
        if not any('jpeg' in s for s in samples):
            return super().views(samples)
        host = [s['images'] for s in samples if 'images' in s]
        return {**jpeg.collate_jpeg(samples), **({'images': torch.stack(host)} if host else {})}


def build_train_loader(cfg, *, rank, world, start_step, max_iter, pin_memory=False, accum=1, dataset=None):
    """Loader of uint8 view batches [B, V, 3, S, S] with (masked) tokens, MLM positions/targets,
    EDA tokens and bad-sample counts, starting at `start_step`. With `accum` = k a batch holds
    the k micro-batches of virtual ranks rank*k .. rank*k+k-1 of a k*world job (JSON Lines: the
    same stream positions, since (t*W + r)*kB = (t*kW + rk)*B; each micro-batch masked alone).
    `dataset`: train_dataset(cfg) if already built."""
    collate = Collate(mask=cfg.mask, seed=cfg.seed, micro=cfg.batch_size)
    kwargs = dict(batch_size=cfg.batch_size * accum, num_workers=cfg.workers, collate_fn=collate,
                  pin_memory=pin_memory, worker_init_fn=lifecycle.loader_worker_init)
    if cfg.workers > 0:  # timeout: a worker that stops responding must not hang the run
        kwargs.update(persistent_workers=True, prefetch_factor=cfg.prefetch, timeout=cfg.limits.batch_timeout_s)
    if cfg.format == 'wds':
        stream = shards.ShardStream(cfg, rank=rank, world=world, start_step=start_step, make_builder=sample_builder)
        return torch.utils.data.DataLoader(stream, **kwargs)
    if cfg.format != 'jsonl':
        raise ValueError(f'data.format must be "jsonl" or "wds", got {cfg.format!r}')
    dataset = dataset if dataset is not None else train_dataset(cfg)
    sampler = data.IterationSampler(len(dataset), batch_size=cfg.batch_size * accum, world_size=world, rank=rank,
                                    max_iter=max_iter, seed=cfg.seed, start_step=start_step)
    return torch.utils.data.DataLoader(dataset, sampler=sampler, drop_last=True, **kwargs)
