"""DeCLIP / CLIP pre-training: one explicit DDP loop with AMP, TensorBoard and exact resume.

    python train.py --config configs/demo.py --workdir runs/demo
    torchrun --nproc_per_node 8 train.py --config configs/vitb32.py --workdir runs/vitb32
    python train.py --config configs/r50.py:smoke --workdir /tmp/smoke --config.optim.warmup_lr=5e-4

A run resumes by itself from `workdir/checkpoints` (last.pt, else the newest kept copy).
"""
import contextlib
import dataclasses
import datetime
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from absl import app, flags, logging
from einops import rearrange
from ml_collections import config_flags

import data
import declip
import evaluate
import images
import losses
import runtime
import text

FLAGS = flags.FLAGS
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
    colour jitter / grayscale / blur per sample from the (seed, step, rank) stream."""
    undecodable = 0
    if 'jpeg' in batch:
        views, undecodable = images.decode_views(batch, size=cfg.data.image_size, device=device)
    else:
        views = batch['images'].to(device, non_blocking=True)
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


# ----------------------------------------------------------------------------------------------
# Configuration checks: fail before any work, naming the key or path
# ----------------------------------------------------------------------------------------------

POSITIVE = ('max_iter', 'log_every', 'ckpt_every', 'keep_every', 'eval_every', 'max_nonfinite',
            'dist_timeout_s', 'mlm_bucket', 'data.batch_size', 'data.prefetch', 'data.bad_window',
            'data.max_pixels', 'loss.queue_size', 'eval.batch_size', 'optim.eps')
NON_NEGATIVE = ('seed', 'stop_at', 'keep_copies', 'tb_images', 'peak_tflops', 'data.workers', 'eval.workers',
                'optim.base_lr', 'optim.warmup_lr', 'optim.min_lr', 'optim.warmup_steps', 'optim.weight_decay',
                *(f'loss.{k}' for k in LOSS_TERMS))
BELOW_ONE = ('optim.beta1', 'optim.beta2', 'data.max_bad_rate')


def check_numbers(cfg):
    """Every number finite; counts, rates and model sizes in range (a NaN learning rate would
    otherwise train NaN weights and a zero batch would fail only after the model is built)."""
    values = runtime.check_values(cfg.to_dict(), [
        (POSITIVE, lambda v: v > 0, '> 0'), (NON_NEGATIVE, lambda v: v >= 0, '>= 0'),
        (BELOW_ONE, lambda v: 0 <= v < 1, 'in [0, 1)'), (('model.',), lambda v: v > 0, '> 0')])
    lo, hi = values['data.crop_scale']
    if not 0 < lo <= hi <= 1:
        raise ValueError(f'config.data.crop_scale: need 0 < min <= max <= 1, got {tuple(cfg.data.crop_scale)}')


def check_config(cfg):
    """Everything the run will need, before any work and before the workdir is created."""
    check_numbers(cfg)
    data.check_config(cfg.data)
    if cfg.data.val_meta:
        evaluate.read_eval_meta(cfg.data.val_meta)   # every line, naming file:line
        try:
            templates = evaluate.load_prompts(cfg.eval.prompts)
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f'config.eval.prompts: {e}') from None
        if not templates:
            raise ValueError(f'config.eval.prompts: {cfg.eval.prompts!r} has no templates')
    if cfg.model.declip and (cfg.data.views != 2 or not cfg.data.mask):
        raise ValueError('config.model.declip needs data.views=2 and data.mask=True')
    runtime.precision(cfg.precision, 'cpu')
    runtime.shape_modes('cpu', jit_compile=cfg.npu_jit_compile, static_shapes=cfg.static_shapes)
    if str(cfg.compile).lower() not in ('auto', 'true', 'false'):
        raise ValueError(f'config.compile: auto, true or false, got {cfg.compile!r}')


# ----------------------------------------------------------------------------------------------
# Around the loop: resume, checkpoints, logging, evaluation
# ----------------------------------------------------------------------------------------------

RUN_DEFINING = ('model.', 'loss.', 'optim.', 'seed', 'data.seed', 'data.batch_size', 'data.format',
                'data.train_root', 'data.train_meta', 'data.shards', 'data.views', 'data.image_size',
                'data.crop_scale', 'data.eda', 'data.eda_synonyms', 'data.mask', 'data.context_length')


def check_resumed_config(saved, cfg, path, allow_change):
    """Refuse (unless allowed) a resume whose config changes what the run computes: model,
    losses, optimiser, batch size, data sources and order; warn for the rest (max_iter too:
    extending a run is deliberate, though it reshapes the rest of the cosine schedule)."""
    lines, refused = runtime.config_changes(saved, cfg.to_dict(), RUN_DEFINING)
    if refused and not allow_change:
        raise ValueError(f'{path} belongs to a run with another config; resuming would change it:\n'
                         + '\n'.join(refused) + '\nuse the same config, another --workdir, or --allow_config_change')
    if lines:
        logging.warning('resuming %s with a changed config:\n%s', path, '\n'.join(lines))


def resume(state, cfg, ckpt_dir, world, *, start_over=False, allow_change=False):
    """Continue from the newest readable checkpoint of the workdir, if there is one. Checkpoints
    that exist but none of which can be read stop the run (unless `start_over`: they are then
    renamed *.unreadable and the run starts from step 0)."""
    path, saved, unreadable = runtime.find_checkpoint(ckpt_dir, warn=logging.warning)
    rank = losses.world_info()[0]
    if saved is None and unreadable and not start_over:
        raise RuntimeError('no readable checkpoint in {}:\n{}\nrepair or move them, or pass --start_over to '
                           'start from step 0'.format(ckpt_dir, '\n'.join(f'  {p}: {e}' for p, e in unreadable)))
    if saved is None:
        if unreadable and world > 1:
            dist.barrier()  # every rank has looked before rank 0 renames
        for bad, _ in unreadable if rank == 0 else ():
            bad.rename(bad.with_name(bad.name + '.unreadable'))
        return
    check_resumed_config(saved['config'], cfg, path, allow_change)
    state.load_state_dict(saved)
    if rank == 0:
        logging.info('resumed from %s at step %d', path, state.step)
    if saved['world_size'] != world:
        logging.warning('resuming a %d-process run with %d processes: data order and NN queues of '
                        'ranks >= %d change', saved['world_size'], world, saved['world_size'])


def save(state, cfg, ckpt_dir):
    """last.pt (and every keep_every steps a kept copy), written by rank 0 for all ranks. Weights
    that are not finite are never written (every rank holds the same parameters, so all agree)."""
    if not torch.stack([p.isfinite().all() for p in state.model.parameters()]).all():
        raise SystemExit(f'step {state.step}: the weights are not finite; no checkpoint written (the last good '
                         f'one in {ckpt_dir} stays)')
    saved = state.state_dict(cfg.to_dict())
    if saved is None:
        return
    runtime.save_checkpoint(ckpt_dir / 'last.pt', saved)
    if state.step % cfg.keep_every == 0 or state.step == cfg.max_iter:
        runtime.save_checkpoint(ckpt_dir / f'step_{state.step}.pt', saved)
        runtime.prune_copies(ckpt_dir, cfg.keep_copies)


def wrap_ddp(state, cfg, world):
    """DDP over the model (several processes); a DeCLIP head whose loss weight is 0 gets no gradient."""
    if world == 1:
        return
    device = state.device
    weights = loss_weights(cfg)
    state.ddp = torch.nn.parallel.DistributedDataParallel(
        state.model, device_ids=[device.index] if device.type == 'cuda' else None,
        find_unused_parameters=cfg.model.declip and not all(weights[k] for k in ('simsiam', 'mlm')))


def zero_shot(state, cfg, autocast, rank, world):
    model = state.model
    model.eval()
    try:
        return evaluate.evaluate(
            model, val_root=cfg.data.val_root, val_meta=cfg.data.val_meta, task='zeroshot',
            prompts=cfg.eval.prompts, class_names=None, batch=cfg.eval.batch_size, workers=cfg.eval.workers,
            device=state.device, autocast=autocast, rank=rank, world=world,
            tokenizer=data.get_tokenizer(cfg.data.bpe_path), max_file_bytes=cfg.data.max_file_bytes,
            sample_timeout_s=cfg.data.sample_timeout_s)
    finally:
        model.train()


class RunLog:
    """TensorBoard (rank 0), the console line and the running means between log steps."""

    def __init__(self, cfg, workdir, *, rank, world, start):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.writer = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(workdir / 'tb'), purge_step=start + 1)  # steps are 1-based
        self.flops_per_step = None
        self._reset()

    def _reset(self):
        self.sums, self.good, self.count, self.t_data, self.t_last = {}, 0.0, 0, 0.0, time.perf_counter()

    def next_batch(self, batches):
        t0 = time.perf_counter()
        batch = next(batches)
        self.t_data += time.perf_counter() - t0
        return batch

    def flop_counter(self):
        """Counts the FLOPs of the first step when an MFU figure is wanted (config.peak_tflops)."""
        if not self.cfg.peak_tflops or self.flops_per_step is not None:
            return None
        from torch.utils.flop_counter import FlopCounterMode
        return FlopCounterMode(display=False)

    def wants_views(self):
        return self.writer is not None and self.cfg.tb_images > 0

    def views(self, views, step):
        """A step's augmented views [B, V, 3, S, S], as images."""
        for v in range(views.shape[1]):
            shown = images.denormalize_images(views[:self.cfg.tb_images, v].float()).cpu()
            self.writer.add_images(f'views/{v}', shown, step)

    def add(self, metrics):
        """Accumulate a step's losses on the device (a skipped step counts for nothing)."""
        kept = 1 - metrics['skipped']
        for name, value in metrics['loss'].items():
            self.sums[name] = self.sums.get(name, 0) + torch.where(kept > 0, value.float(), 0.0)
        self.good = self.good + kept
        self.count += 1

    def log(self, state, metrics, end):
        """Every rank calls this at a log step (the bad-sample sum is a collective)."""
        step, n_good = state.step, float(self.good)
        values = {k: float(v) / n_good for k, v in self.sums.items()} if n_good else {}
        bad = runtime.all_reduce_sum(state.bad_totals, state.device)
        elapsed = time.perf_counter() - self.t_last
        step_s = elapsed / self.count
        img_s = self.cfg.data.batch_size * self.world / step_s
        if self.writer is not None:
            scalars = {f'loss/{k}': v for k, v in values.items()}
            scalars.update({
                'train/lr': state.optimizer.param_groups[0]['lr'],
                'train/logit_scale': state.model.logit_scale.exp().item(),
                'train/grad_norm': float(metrics['grad_norm']), 'train/nonfinite_steps': int(state.nonfinite_total),
                'perf/img_per_s': img_s, 'perf/img_per_s_per_device': img_s / self.world,
                'perf/step_ms': step_s * 1000, 'perf/data_wait_frac': self.t_data / elapsed,
                'mem/peak_gib': runtime.peak_memory_gib(state.device.type)})
            if self.cfg.peak_tflops and self.flops_per_step:
                scalars['perf/mfu'] = self.flops_per_step / step_s / (self.cfg.peak_tflops * 1e12)
            scalars.update({f'data/bad_{kind}': n for kind, n in zip(data.BAD_KINDS, bad.tolist())})
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
            eta = datetime.timedelta(seconds=int(step_s * (end - step)))
            print(f'step {step}/{self.cfg.max_iter} | eta {eta} | {img_s:.1f} img/s | lr {scalars["train/lr"]:.2e} | '
                  + ' '.join(f'{k} {v:.4f}' for k, v in values.items()), flush=True)
        self._reset()

    def evaluation(self, metrics, step):
        if self.writer is not None:
            skipped = metrics.get('images_skipped', 0)
            for k in ('zeroshot_top1', 'zeroshot_top5', 'images_skipped'):
                self.writer.add_scalar(f'eval/{k}', metrics.get(k, 0), step)
            print(f'step {step}: zero-shot top-1 {metrics["zeroshot_top1"]:.2f} top-5 {metrics["zeroshot_top5"]:.2f} '
                  f'({metrics["images"]} images' + (f', {skipped} unreadable skipped)' if skipped else ')'), flush=True)
        self.t_last = time.perf_counter()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def stop_if_diverged(state, cfg, ckpt_dir):
    """A clean stop after config.max_nonfinite consecutive skipped steps (checked at log steps)."""
    run_len = int(state.nonfinite_run)
    if run_len:
        logging.warning('step %d: non-finite loss, step skipped (%d in a row)', state.step, run_len)
    if run_len >= cfg.max_nonfinite:
        raise SystemExit(f'stopping: {run_len} consecutive non-finite losses at step {state.step} (config.'
                         f'max_nonfinite={cfg.max_nonfinite}); the last checkpoint in {ckpt_dir} is intact')


def due(step, every):
    return step % every == 0


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------

def train(cfg, workdir, *, start_over=False, allow_config_change=False):
    """Check the config, set up device and processes, hold the workdir, run the loop; returns
    the model."""
    check_config(cfg)
    runtime.exit_with_parent()
    device, device_type = runtime.setup_device(runtime.dist_env()[2], cfg.device)
    if cfg.data.decode == 'device' and device_type not in ('cuda', 'cpu'):
        raise ValueError(f'config.data.decode=device needs CUDA (nvJPEG); on {device_type} torchvision would '
                         f'decode on the CPU inside the training process: use data.decode=host')
    jit, static = runtime.configure_shapes(device_type, jit_compile=cfg.npu_jit_compile,
                                           static_shapes=cfg.static_shapes)
    workdir, first = Path(workdir), runtime.dist_env()[0] == 0
    if first:
        (workdir / 'checkpoints').mkdir(parents=True, exist_ok=True)
    with (runtime.workdir_lock(workdir) if first else contextlib.nullcontext()), \
            runtime.processes(device_type, cfg.dist_timeout_s) as (rank, world):
        if rank == 0:
            dtype = runtime.precision(cfg.precision, device_type)[0]
            backend = dist.get_backend() if dist.is_initialized() else 'none (one process)'
            npu = f' | jit compile {jit}' if jit is not None else ''
            print(f'device {device} | backend {backend} | precision {dtype} | world size {world} | '
                  f'static shapes {static}{npu}', flush=True)
        state = build_state(cfg, device, rank)
        state.static_shapes = static
        resume(state, cfg, workdir / 'checkpoints', world, start_over=start_over, allow_change=allow_config_change)
        wrap_ddp(state, cfg, world)
        return run(state, cfg, workdir, rank, world)


def eval_due(step, cfg):
    return bool(cfg.data.val_meta) and step > 0 and (due(step, cfg.eval_every) or step == cfg.max_iter)


def run(state, cfg, workdir, rank, world):
    """The loop: a step, then logging, checkpoint and evaluation when due. A signal stops it after
    the step all ranks agree on, with a checkpoint; an evaluation that a crash interrupted runs
    again first on resume (the checkpoint before it was written first)."""
    ckpt_dir, marker = workdir / 'checkpoints', workdir / 'checkpoints' / 'evaluated_step'
    if rank == 0:
        for stale in ckpt_dir.glob('*.tmp'):  # a write interrupted by a crash (the lock says it is no one's)
            stale.unlink()
    _, autocast, _ = runtime.precision(cfg.precision, state.device.type)
    start, end = state.step, min(cfg.stop_at or cfg.max_iter, cfg.max_iter)
    if start >= end:
        if rank == 0:
            print(f'nothing to do: the run is at step {start} and this invocation ends at step {end} '
                  f'(stop_at={cfg.stop_at}, max_iter={cfg.max_iter})', flush=True)
        return state.model
    batches = iter(data.build_train_loader(cfg.data, rank=rank, world=world, start_step=start,
                                           max_iter=cfg.max_iter, pin_memory=state.device.type != 'cpu'))
    log = RunLog(cfg, workdir, rank=rank, world=world, start=start)

    def evaluation():
        log.evaluation(zero_shot(state, cfg, autocast, rank, world), state.step)
        if rank == 0:
            marker.write_text(str(state.step))

    if eval_due(start, cfg) and (not marker.is_file() or marker.read_text().strip() != str(start)):
        evaluation()
    with runtime.StopSignals() as signals:
        stop, stopping = None, False
        while state.step < end and not stopping:
            batch = log.next_batch(batches)
            log_now = due(state.step + 1, cfg.log_every) or state.step + 1 == end
            counter = log.flop_counter()
            with counter or contextlib.nullcontext():
                metrics = train_step(state, batch, cfg=cfg, autocast=autocast, rank=rank, world=world,
                                     grad_norm=log_now, keep_views=state.step == start and log.wants_views(),
                                     stop=signals.received is not None)
            if counter is not None:
                log.flops_per_step = counter.get_total_flops()
            if 'views' in metrics:
                log.views(metrics['views'], start)
            log.add(metrics)
            if log_now:
                stop_if_diverged(state, cfg, ckpt_dir)
                log.log(state, metrics, end)
            stopping = stop is not None and bool(stop)   # the previous step's flag, the same on every rank
            stop = metrics['stop']
            if due(state.step, cfg.ckpt_every) or state.step == end or eval_due(state.step, cfg) or stopping:
                save(state, cfg, ckpt_dir)  # skipped steps changed nothing: still the last good state
            if eval_due(state.step, cfg) and not stopping:
                evaluation()
    log.close()
    if stopping:
        raise SystemExit(f'stopped at step {state.step} ({signals.received or "signal on another rank"}); the '
                         f'checkpoint is written: run the same command to resume')
    return state.model


def main(argv):
    del argv
    if FLAGS.workdir is None:
        raise app.UsageError('--workdir is required')
    train(FLAGS.config, FLAGS.workdir, start_over=FLAGS.start_over, allow_config_change=FLAGS.allow_config_change)


if __name__ == '__main__':
    config_flags.DEFINE_config_file('config', None, 'config file, e.g. configs/demo.py or configs/r50.py:smoke',
                                    lock_config=True)
    flags.DEFINE_string('workdir', None, 'where checkpoints/ and tb/ go; an existing run resumes')
    flags.DEFINE_bool('start_over', False, 'when no checkpoint of the workdir can be read, rename them '
                      '*.unreadable and start from step 0 (otherwise that is an error)')
    flags.DEFINE_bool('allow_config_change', False, 'resume even if the config changes the model, losses, '
                      'optimiser, schedule, batch size or data')
    flags.mark_flag_as_required('config')
    app.run(main)
