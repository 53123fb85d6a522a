"""One training step and the state it changes: model, optimiser, schedule, TrainState, train_step.

train.py runs it in its loop, tools/bench.py times it, the tests call it; accum.train_step, its variant
for accum_steps > 1, is built from its pieces (step_inputs, update). Nothing here logs or saves.
"""
from __future__ import annotations  # TrainState's `X | None` fields on Python 3.9 (torch_npu 2.6)

import contextlib
import dataclasses
import functools
import math

import torch
import torch.distributed as dist
from einops import rearrange

import declip
import images
import losses
import runtime
import seeds
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


# config.runtime.compile -> what torch.compile compiles: the two towers, the model's whole training
# forward (towers, SimSiam heads, the MLM head on the masked positions; 1.04x the towers' speed
# for ViT-B/32 on an H200, BENCHMARKS.md), or 'step': that forward and the objective (its gathers
# run eager); 'true' and 'auto' (on CUDA) take the whole forward
COMPILE_SCOPES = {'false': None, 'towers': 'towers', 'model': 'model', 'step': 'step', 'true': 'model',
                  'auto': 'model'}


def compile_scope(setting, device_type):
    """What config.runtime.compile compiles on `device_type` (None: nothing); an unknown setting is an error."""
    setting = str(setting).lower()
    if setting not in COMPILE_SCOPES:
        raise ValueError(f'config.runtime.compile: one of {", ".join(COMPILE_SCOPES)}, got {setting!r}')
    return None if setting == 'auto' and device_type != 'cuda' else COMPILE_SCOPES[setting]


def build_model(cfg, device):
    """cfg.model on `device` as the step runs it: channels-last ResNet on CUDA, compiled as
    config.runtime.compile says (in place: state-dict names unchanged)."""
    model = declip.build_model(cfg.model).to(device)
    if cfg.model.vision == 'resnet' and device.type == 'cuda':  # NHWC is slow on NPU
        model = model.to(memory_format=torch.channels_last)
    scope = compile_scope(cfg.runtime.compile, device.type)
    if scope in ('model', 'step'):
        model.compile()
    elif scope == 'towers':
        model.visual.compile()
        model.encode_text.compile()
    return model


def build_optimizer(model, optim, device_type, use_scaler=False):
    """AdamW over the reference's parameter groups: torch's, fused where torch has it, so a step can
    be skipped on the device (found_inf); torch_npu's fused one on a 910 with fp16 (`use_scaler`),
    where torch's would loop over the parameters. Its state dict has torch's layout everywhere."""
    groups = param_groups(model, optim.weight_decay)
    hyper = dict(lr=optim.base_lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    npu_fused = runtime.npu_fused_adamw(device_type, use_scaler)
    optimizer = (npu_fused(groups, **hyper) if npu_fused is not None
                 else torch.optim.AdamW(groups, **hyper, fused=device_type in ('cuda', 'cpu')))
    return runtime.portable_adamw(optimizer)


def loss_weights(cfg):
    return {k: cfg.loss[k] for k in LOSS_TERMS}


# ----------------------------------------------------------------------------------------------
# The state one step changes, and the step
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainState:
    """Everything a training step changes and a checkpoint keeps. `ddp` is what the step calls
    (the model itself in a single process); `queue` [k, Q, D] holds the NN memories (unit-norm
    fp32 rows, None without the NN term) of this rank's k = accum_steps virtual devices and
    `queue_ptr` their common FIFO write position; `bad_totals` sums the count vectors of the
    bad samples each batch carries under 'bad' (one count per kind; the step does not know the
    kinds: train.py gives it a zero vector of the loader's length) on this rank, and on rank 0 also
    the restored sum of a resumed run;
    `static_shapes`: the step keeps every tensor shape fixed (runtime.shape_modes); `compiled`: the
    objective runs compiled (config.runtime.compile='step'); `autocast`:
    config.runtime.precision's context for the forwards; `stop_requested`: set by the loop when a
    signal arrived here (the step tells every rank); `inputs`: what the checkpoint records of the
    global batch and the training data (checkpoints.run_identity), for a resume to compare."""
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
    compiled: bool = False
    autocast: contextlib.AbstractContextManager = dataclasses.field(default_factory=contextlib.nullcontext)
    stop_requested: bool = False
    inputs: dict = dataclasses.field(default_factory=dict)

    @property
    def device(self):
        return self.nonfinite_run.device

    @property
    def forward(self):
        """What a training forward calls: the DDP wrapper, or the model itself in one process."""
        return self.model if self.ddp is None else self.ddp

    def state_dict(self, config):
        """The checkpoint dict on rank 0, None on the others (bad_totals a count vector, named by
        kind in the file by checkpoints.save). A collective: every rank calls it
        (bad-sample counts are summed over ranks, every rank's queues go to rank 0 one at a time:
        `queues` has one [Q, D] entry per virtual device, in virtual-rank order)."""
        rank, world = losses.world_info()
        bad = runtime.all_reduce_sum(self.bad_totals, self.device)
        queues = runtime.rows_to_first(self.queue, world) if self.queue is not None else []
        if rank != 0:
            return None
        return {'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
                'scaler': self.scaler.state_dict(), 'step': self.step, 'queues': queues,
                'queue_ptr': self.queue_ptr, 'rng': torch.get_rng_state(), 'config': config,
                'world_size': world, 'nonfinite_total': int(self.nonfinite_total),
                'bad_totals': bad, **self.inputs}

    def load_state_dict(self, state):
        rank, _ = losses.world_info()
        self.model.load_state_dict(state['model'])
        self.optimizer.load_state_dict(state['optimizer'])
        if state['scaler']:   # torch_npu's scaler also wants 'dynamic', which torch's never writes
            self.scaler.load_state_dict({'dynamic': True, **state['scaler']})
        self.step, self.queue_ptr = state['step'], state['queue_ptr']
        k = 0 if self.queue is None else len(self.queue)
        if k and (rank + 1) * k <= len(state['queues']):
            self.queue = torch.stack(state['queues'][rank * k:(rank + 1) * k]).to(self.queue.device)
        torch.set_rng_state(state['rng'])
        self.nonfinite_total += state['nonfinite_total']
        if rank == 0:   # the restored sum over ranks is counted once
            self.bad_totals = self.bad_totals + torch.as_tensor(state['bad_totals'])


def build_state(cfg, device, rank=0):
    """A fresh TrainState: identical initial weights on every rank (same seed), one queue per
    virtual device v = rank * accum_steps + j (seeded by v, as rank v of the larger job)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, device)
    _, autocast, use_scaler = runtime.precision(cfg.runtime.precision, device.type)
    queue, k = None, cfg.accum_steps
    if cfg.model.declip and cfg.loss.nn > 0:
        queue = torch.stack([losses.init_queue(cfg.loss.queue_size, cfg.model.embed_dim, device=device,
                                               generator=torch.Generator().manual_seed(cfg.seed * 1000 + v))
                             for v in range(rank * k, (rank + 1) * k)])
    counter = torch.zeros((), dtype=torch.long, device=device)
    return TrainState(model=model, optimizer=build_optimizer(model, cfg.optim, device.type, use_scaler),
                      scaler=runtime.grad_scaler(device.type, use_scaler), queue=queue, autocast=autocast,
                      compiled=compile_scope(cfg.runtime.compile, device.type) == 'step',
                      nonfinite_run=counter.clone(), nonfinite_total=counter.clone(),
                      bad_totals=torch.zeros((), dtype=torch.long))


def device_views(batch, *, cfg, step, rank, world, device, static=False):
    """Normalised views [B, V, 3, S, S] on `device`: the loader's uint8 views, then (moco_v2)
    colour jitter / grayscale / blur per sample from the (seed, step, rank) stream."""
    views = images.to_device(batch['images'], device)
    if not images.moco_views(cfg.data.augmentation):   # crops only
        return images.normalize_images(views.flatten(0, 1)).view(views.shape)
    gen = seeds.generator(cfg.seed, step * world + rank)
    out = images.device_augment(rearrange(views, 'b v c h w -> (b v) c h w'), generator=gen, static=static)
    return rearrange(out, '(b v) c h w -> b v c h w', v=views.shape[1])


def step_inputs(state, batch, *, cfg, rank, world):
    """One device's inputs on the device: normalised augmented views, (masked) captions, EDA
    captions, MLM positions and targets (padded to mlm_bucket with static shapes)."""
    views = device_views(batch, cfg=cfg, step=state.step, rank=rank, world=world,
                                      device=state.device, static=state.static_shapes)
    names = ('text', 'text_eda', 'mlm_index', 'mlm_targets')
    host = {k: batch[k] for k in names if k in batch}
    if state.static_shapes and 'mlm_index' in host:
        host['mlm_index'], host['mlm_targets'] = text.pad_positions(host['mlm_index'], host['mlm_targets'],
                                                                    cfg.runtime.mlm_bucket)
    out = {k: images.to_device(host[k], state.device) if k in host else None for k in names}
    return dict(out, views=views)


def set_learning_rate(state, cfg):
    """The schedule's learning rate for the step about to run (1-based: state.step + 1)."""
    for group in state.optimizer.param_groups:
        group['lr'] = lr_at(state.step + 1, cfg.optim, cfg.max_iter)


def train_step(state, batch, cfg):
    """One whole training step (accum.train_step is its variant for accum_steps > 1); returns
    {'loss': {'total': value, term: value}, 'skipped': 0/1, 'stop': 0/1, 'grad_norm', 'views'}
    as device tensors ('views' is the step's own tensor, not a copy)."""
    rank, world = losses.world_info()
    set_learning_rate(state, cfg)
    # 1-2. views with this device's colour-op stream; captions, MLM positions, EDA captions
    inputs = step_inputs(state, batch, cfg=cfg, rank=rank, world=world)
    # 3. features under autocast
    with state.autocast:
        out = state.forward(inputs['views'], inputs['text'], text_eda=inputs['text_eda'],
                            mlm_index=inputs['mlm_index'])
    # 4. the weighted objective (neighbours from the queue as it was, features gathered with
    #    gradient over ranks), backward
    queue = state.queue[0] if state.queue is not None else None
    total, terms, keys = as_run(state, losses.declip_loss)(out, queue=queue, mlm_targets=inputs['mlm_targets'],
                                                           weights=loss_weights(cfg))
    state.scaler.scale(total).backward()
    # 5. skip flag, queue push, optimiser step, logit-scale clamp
    metrics = update(state, batch, total=total, keys=[keys])
    return dict(metrics, loss={'total': total.detach(), **terms}, views=inputs['views'].detach())


@functools.cache
def compiled(fn):
    """A function of the objective (losses.declip_loss, or the accumulation step's parts) under
    torch.compile, built once per process: dynamic shapes, as the number of masked tokens changes
    every step; its collectives run eager (losses.eager)."""
    return torch.compile(fn, dynamic=True)


def as_run(state, fn):
    """`fn` as this state's step runs it: compiled under config.runtime.compile='step'."""
    return compiled(fn) if state.compiled else fn


def update(state, batch, *, total, keys):
    """The end of a step whose gradients are in .grad: a non-finite loss on any rank skips it
    everywhere (no weight, optimiser-state or queue row changes; the queue pointer still
    advances); else push each (virtual) device's `keys` into its queue and take the AdamW step,
    the logit scale clamped into [3, 6] before and after it (so the first forward used
    ln(1/0.07)); count skips, bad samples and the step. Returns {'skipped', 'stop', 'grad_norm'}:
    'stop' is state.stop_requested on any rank, carried by the same all-reduce."""
    skip, stop = flags_anywhere(total, state.stop_requested, losses.world_info()[1])
    if state.queue is not None:
        state.queue, state.queue_ptr = push_queues(state.queue, state.queue_ptr, keys, skip)
    state.model.clamp_logit_scale_()
    state.scaler.unscale_(state.optimizer)
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in state.model.parameters() if p.grad is not None])
    optimizer_step(state, skip)
    state.model.clamp_logit_scale_()
    state.nonfinite_run = (state.nonfinite_run + 1) * skip.long()
    state.nonfinite_total += skip.long()
    if 'bad' in batch:
        state.bad_totals = state.bad_totals + batch['bad']
    state.step += 1
    return {'skipped': skip, 'stop': stop, 'grad_norm': grad_norm}


def push_queues(queue, ptr, keys, skip):
    """(queues [k, Q, D], pointer) after FIFO writes of each virtual device's keys (its list in
    `keys`) into its own queue, no row changed where `skip`."""
    queues, end = [], ptr
    for one, device_keys in zip(queue, keys):
        end = ptr
        for key in device_keys:
            one, end = losses.nn_queue_push(queue=one, ptr=end, feats=key, skip=skip)
        queues.append(one)
    return torch.stack(queues), end


def flags_anywhere(total, stop, world):
    """(loss not finite, stop requested) on any rank, as 0/1 device tensors: one small
    collective, no host sync (the loop reads the stop flag a step later)."""
    flags = torch.stack([(~torch.isfinite(total.detach())).float(),
                         torch.full((), float(stop), device=total.device)])
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags[0], flags[1]


def optimizer_step(state, skip):
    """AdamW step that changes nothing where `skip`: the GradScaler's own inf check (fp16; on the
    host, the step not called, for torch_npu's fused AdamW), torch's fused AdamW's found_inf on
    the device, else a host-side test."""
    opt = state.optimizer
    if state.scaler.is_enabled():
        state.scaler.step(opt)
        state.scaler.update()
    elif opt.defaults.get('fused'):
        opt.found_inf, opt.grad_scale = skip, None
        opt.step()
    elif not skip.item():
        opt.step()
    runtime.clear_grads(opt)
