"""One training step and the state it changes: model, optimiser, schedule, TrainState, train_step.

train.py runs it in its loop, bench.py times it, the tests call it; nothing here logs or saves.
"""
import dataclasses
import math
import os

import torch
import torch.distributed as dist
from einops import rearrange

import data
import declip
import images
import losses
import runtime
import text

LOSS_TERMS = ('clip', 'simsiam', 'mlm', 'nn')

# ----------------------------------------------------------------------------------------------
# Model, optimiser and schedule
# ----------------------------------------------------------------------------------------------

NO_DECAY_MODULES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm)


def param_groups(model, weight_decay):
    """AdamW groups as the reference builds them: no decay for every bias of Linear/Conv/BN/LN,
    BN and LN weights and logit_scale; decay for everything else, including embeddings, class and
    positional embeddings and the attention in-projection bias."""
    no_decay = set()
    for module in model.modules():
        if isinstance(module, NO_DECAY_MODULES) and getattr(module, 'bias', None) is not None:
            no_decay.add(module.bias)
        if isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm)):
            no_decay.add(module.weight)
    no_decay.add(model.logit_scale)
    params = [p for p in model.parameters() if p.requires_grad]
    return [{'params': [p for p in params if p not in no_decay], 'weight_decay': weight_decay},
            {'params': [p for p in params if p in no_decay], 'weight_decay': 0.0}]


def lr_at(t, optim, max_iter):
    """LR of 1-based iteration t: linear warmup base_lr -> warmup_lr over warmup_steps, then cosine
    from warmup_lr to min_lr at max_iter (the reference's CosineLRScheduler)."""
    if t < optim.warmup_steps:
        return optim.base_lr + (optim.warmup_lr - optim.base_lr) * (t - 1) / max(optim.warmup_steps - 1, 1)
    progress = (t - optim.warmup_steps) / max(max_iter - optim.warmup_steps, 1)
    return optim.min_lr + (optim.warmup_lr - optim.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def build_model(cfg, device):
    """cfg.model on `device` as the step runs it: channels-last ResNet on CUDA, both towers
    compiled when config.compile says so ('auto': on CUDA)."""
    model = declip.build_model(cfg.model).to(device)
    if cfg.model.vision == 'resnet' and device.type == 'cuda':  # NHWC is slow on NPU
        model = model.to(memory_format=torch.channels_last)
    mode = str(cfg.compile).lower()
    if mode == 'true' or (mode == 'auto' and device.type == 'cuda'):
        model.visual.compile()        # in place: state-dict names unchanged
        model.encode_text.compile()
    return model


def build_optimizer(model, optim, device_type):
    """AdamW over the reference's parameter groups; fused where torch has it, so a step can be
    skipped on the device (found_inf)."""
    return torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.base_lr,
                             betas=(optim.beta1, optim.beta2), eps=optim.eps,
                             fused=device_type in ('cuda', 'cpu'))


def loss_weights(cfg):
    return {k: cfg.loss[k] for k in LOSS_TERMS}


# ----------------------------------------------------------------------------------------------
# The state one step changes, and the step
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainState:
    """Everything a training step changes and a checkpoint keeps. `ddp` is what the step calls
    (the model itself in a single process); `queue` is this rank's NN memory (unit-norm fp32
    rows, None without the NN term) and `queue_ptr` its FIFO write position; `bad_totals` counts
    this rank's bad samples by kind (rank 0 also carries the restored sum of a resumed run);
    `static_shapes`: the step keeps every tensor shape fixed (runtime.shape_modes)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    queue: torch.Tensor | None
    nonfinite_run: torch.Tensor
    nonfinite_total: torch.Tensor
    bad_totals: torch.Tensor
    queue_ptr: int = 0
    step: int = 0
    ddp: torch.nn.Module | None = None
    static_shapes: bool = False

    @property
    def device(self):
        return self.nonfinite_run.device

    def state_dict(self, config):
        """The checkpoint dict on rank 0, None on the others. A collective: every rank calls it
        (bad-sample counts are summed over ranks, every rank's queue goes to rank 0)."""
        rank, world = losses.world_info()
        bad = runtime.all_reduce_sum(self.bad_totals, self.device)
        queues = runtime.gather_to_first(self.queue, world) if self.queue is not None else []
        if rank != 0:
            return None
        return {'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
                'scaler': self.scaler.state_dict(), 'step': self.step, 'queues': [q.cpu() for q in queues],
                'queue_ptr': self.queue_ptr, 'rng': torch.get_rng_state(), 'config': config,
                'world_size': world, 'nonfinite_total': int(self.nonfinite_total),
                'bad_totals': dict(zip(data.BAD_KINDS, bad.tolist()))}

    def load_state_dict(self, state):
        rank, _ = losses.world_info()
        self.model.load_state_dict(state['model'])
        self.optimizer.load_state_dict(state['optimizer'])
        if state['scaler']:
            self.scaler.load_state_dict(state['scaler'])
        self.step, self.queue_ptr = state['step'], state['queue_ptr']
        if self.queue is not None and rank < len(state['queues']):
            self.queue = state['queues'][rank].to(self.queue.device)
        torch.set_rng_state(state['rng'])
        self.nonfinite_total += state['nonfinite_total']
        if rank == 0:  # the restored sum over ranks is counted once (kinds this code knows)
            self.bad_totals += torch.tensor([state['bad_totals'].get(k, 0) for k in data.BAD_KINDS])


def build_state(cfg, device, rank=0):
    """A fresh TrainState: identical initial weights on every rank (same seed), per-rank queue."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, device)
    _, _, use_scaler = runtime.precision(cfg.precision, device.type)
    queue = None
    if cfg.model.declip and cfg.loss.nn > 0:
        queue = losses.init_queue(cfg.loss.queue_size, cfg.model.embed_dim, device=device,
                                  generator=torch.Generator().manual_seed(cfg.seed * 1000 + rank))
    counter = torch.zeros((), dtype=torch.long, device=device)
    return TrainState(model=model, optimizer=build_optimizer(model, cfg.optim, device.type),
                      scaler=runtime.grad_scaler(device.type, use_scaler), queue=queue,
                      nonfinite_run=counter.clone(), nonfinite_total=counter.clone(),
                      bad_totals=torch.zeros(len(data.BAD_KINDS), dtype=torch.long))


def device_views(batch, *, cfg, step, rank, world, device, static=False):
    """(normalised views [B, V, 3, S, S] on `device`, images nothing could decode): the loader's
    uint8 views (or, with data.decode='device', its JPEG bytes decoded and cropped here), then
    (moco_v2) colour jitter / grayscale / blur per sample from the (seed, step, rank) stream."""
    undecodable = 0
    if 'jpeg' in batch:
        views, undecodable = images.decode_views(batch, size=cfg.data.image_size, device=device)
    else:
        views = batch['images'].to(device, non_blocking=True)
    if cfg.data.augmentation == 'standard_clip':   # crops only
        return images.normalize_images(views.flatten(0, 1)).view(views.shape), undecodable
    gen = data.generator(cfg.seed, step * world + rank)
    out = images.device_augment(rearrange(views, 'b v c h w -> (b v) c h w'), generator=gen, static=static)
    return rearrange(out, '(b v) c h w -> b v c h w', v=views.shape[1]), undecodable


def flags_anywhere(total, stop, world):
    """(loss not finite, stop requested) on any rank, as 0/1 device tensors: one small
    collective, no host sync (the loop reads the stop flag a step later)."""
    flags = torch.stack([(~torch.isfinite(total.detach())).float(),
                         torch.full((), float(stop), device=total.device)])
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags[0], flags[1]


def optimizer_step(state, skip):
    """AdamW step that changes nothing where `skip`: the GradScaler's own inf check (fp16),
    fused AdamW's found_inf on the device, else a host-side test."""
    opt = state.optimizer
    if state.scaler.is_enabled():
        state.scaler.step(opt)
        state.scaler.update()
    elif opt.defaults['fused']:
        opt.found_inf, opt.grad_scale = skip, None
        opt.step()
    elif not skip.item():
        opt.step()
    opt.zero_grad(set_to_none=True)


def train_step(state, batch, *, cfg, autocast, rank=0, world=1, grad_norm=False, keep_views=False, stop=False):
    """One whole training step; returns {'loss': {term: value}, 'skipped': 0/1, 'stop': 0/1
    [, 'grad_norm'] [, 'views']} as device tensors. A non-finite loss on any rank skips the step
    everywhere: no weight, optimiser-state or queue row changes (the queue pointer still
    advances). `stop` (a signal arrived here) becomes 'stop' on every rank."""
    device = state.device
    for group in state.optimizer.param_groups:
        group['lr'] = lr_at(state.step + 1, cfg.optim, cfg.max_iter)
    # 1-2. the loader's views, colour ops on the device; (masked) captions, MLM positions, EDA captions
    views, undecodable = device_views(batch, cfg=cfg, step=state.step, rank=rank, world=world, device=device,
                                      static=state.static_shapes)
    names = ('text', 'text_eda', 'mlm_index', 'mlm_targets')
    host = {k: batch[k] for k in names if k in batch}
    if state.static_shapes and 'mlm_index' in host:
        host['mlm_index'], host['mlm_targets'] = text.pad_positions(host['mlm_index'], host['mlm_targets'],
                                                                    cfg.mlm_bucket)
    tokens, text_eda, mlm_index, mlm_targets = (
        host[k].to(device, non_blocking=True) if k in host else None for k in names)
    # 3. features of both views and both captions (+ masked-token logits, SimSiam heads)
    with autocast:
        forward = state.model if state.ddp is None else state.ddp
        out = forward(views, tokens, text_eda=text_eda, mlm_index=mlm_index)
    # 4. the weighted objective; neighbours come from the queue as it was before this step
    total, terms, keys = losses.declip_loss(out, queue=state.queue, mlm_targets=mlm_targets,
                                            weights=loss_weights(cfg))
    if _injected_nonfinite(state.step):
        total = total * float('nan')
    skip, stop = flags_anywhere(total, stop, world)
    # 5. logit scale into [3, 6] (so the first forward used ln(1/0.07)); backward; queue push and
    #    optimiser step (both no-ops where skip); the clamp again
    state.model.clamp_logit_scale_()
    state.scaler.scale(total).backward()
    for k in keys:
        state.queue, state.queue_ptr = losses.nn_queue_push(queue=state.queue, ptr=state.queue_ptr, feats=k,
                                                            skip=skip)
    metrics = {'loss': {'total': total.detach(), **terms}, 'skipped': skip, 'stop': stop}
    if keep_views:
        metrics['views'] = views.detach()
    if grad_norm:
        state.scaler.unscale_(state.optimizer)
        metrics['grad_norm'] = torch.nn.utils.get_total_norm(
            [p.grad for p in state.model.parameters() if p.grad is not None])
    optimizer_step(state, skip)
    state.model.clamp_logit_scale_()
    state.nonfinite_run = (state.nonfinite_run + 1) * skip.long()
    state.nonfinite_total += skip.long()
    if 'bad' in batch:
        state.bad_totals += batch['bad']
    state.bad_totals[data.BAD_KINDS.index('truncated')] += undecodable
    state.step += 1
    return metrics


def _injected_nonfinite(step):
    """Fault-injection hook: DECLIP_TEST_NONFINITE_STEPS=3,7 makes those (0-based) steps' loss NaN."""
    return str(step) in os.environ.get('DECLIP_TEST_NONFINITE_STEPS', '').split(',')
