"""DeCLIP / CLIP pre-training: one explicit DDP loop with AMP, TensorBoard and exact resume.

    python train.py --config configs/demo.py --workdir runs/demo
    torchrun --nproc_per_node 8 train.py --config configs/vitb32.py --workdir runs/vitb32
    python train.py --config configs/r50.py:smoke --workdir /tmp/smoke --config.optim.warmup_lr=5e-4

A run resumes by itself from `workdir/checkpoints` (last.pt, else the newest kept copy).
"""
import contextlib
import datetime
import math
import os
import resource
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
import losses

FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------------------------
# Devices, processes, precision
# ----------------------------------------------------------------------------------------------

def dist_env():
    """(rank, world size, local rank) from torchrun's environment; a single process without it."""
    env = os.environ
    return int(env.get('RANK', 0)), int(env.get('WORLD_SIZE', 1)), int(env.get('LOCAL_RANK', 0))


def setup_device(local_rank):
    """The accelerator torch sees (Ascend NPU when torch_npu is installed, CUDA, ...), else CPU."""
    with contextlib.suppress(ImportError):
        import torch_npu  # noqa: F401  (registers the 'npu' device)
    if torch.accelerator.is_available():
        device_type = torch.accelerator.current_accelerator().type
        torch.accelerator.set_device_index(local_rank)
        return torch.device(device_type, local_rank), device_type
    return torch.device('cpu'), 'cpu'


def init_distributed(device_type, rank, world, timeout_s):
    backend = {'cuda': 'nccl', 'npu': 'hccl'}.get(device_type, 'gloo')
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def finish_distributed():
    """Every process ends with barrier + destroy (gloo processes may abort at exit otherwise)."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier()
        dist.destroy_process_group()


def precision(name, device_type):
    """(dtype, autocast context, use GradScaler): bf16 on accelerators, fp32 on CPU by default."""
    if name == 'auto':
        name = 'fp32' if device_type == 'cpu' else 'bf16'
    dtypes = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}
    if name not in dtypes:
        raise ValueError(f'precision must be auto, bf16, fp16 or fp32, got {name!r}')
    dtype = dtypes[name]
    ctx = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device_type, dtype=dtype)
    return dtype, ctx, dtype == torch.float16


# ----------------------------------------------------------------------------------------------
# Optimiser and schedule (reference section 6)
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
    from warmup_lr to min_lr at max_iter (reference 6.2)."""
    if t < optim.warmup_steps:
        return optim.base_lr + (optim.warmup_lr - optim.base_lr) * (t - 1) / max(optim.warmup_steps - 1, 1)
    progress = (t - optim.warmup_steps) / max(max_iter - optim.warmup_steps, 1)
    return optim.min_lr + (optim.warmup_lr - optim.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# Checkpoints: tensors and plain types only, atomic, auto-resume
# ----------------------------------------------------------------------------------------------

def save_checkpoint(path, state):
    """Write to a temporary file, fsync, rename: a crash never leaves a partial `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    _test_pause('DECLIP_TEST_PAUSE_BEFORE_RENAME')
    os.replace(tmp, path)


def find_checkpoint(ckpt_dir):
    """last.pt, else the newest kept copy; unreadable files are skipped with a warning."""
    ckpt_dir = Path(ckpt_dir)
    candidates = [ckpt_dir / 'last.pt'] + sorted(ckpt_dir.glob('step_*.pt'), key=lambda p: -int(p.stem[5:]))
    for path in candidates:
        if path.is_file():
            try:
                return path, evaluate.safe_load(path)
            except Exception as e:  # noqa: BLE001 - try the next copy
                logging.warning('skipping unreadable checkpoint %s: %s', path, e)
    return None, None


def prune_copies(ckpt_dir, keep):
    if keep > 0:
        copies = sorted(Path(ckpt_dir).glob('step_*.pt'), key=lambda p: int(p.stem[5:]))
        for old in copies[:-keep]:
            old.unlink()


def _test_pause(var):
    """Fault-injection hook for the reliability tests (sleeps while the variable is set)."""
    if os.environ.get(var):
        time.sleep(float(os.environ[var]))


def _injected_nonfinite(step):
    """Fault-injection hook: DECLIP_TEST_NONFINITE_STEPS=3,7 makes those steps' loss NaN."""
    steps = os.environ.get('DECLIP_TEST_NONFINITE_STEPS', '')
    return str(step) in steps.split(',')


# ----------------------------------------------------------------------------------------------
# Configuration checks: fail before any work, naming the key or path
# ----------------------------------------------------------------------------------------------

def check_config(cfg):
    def need_file(key, path):
        if not path or not Path(path).is_file():
            raise ValueError(f'config.{key}: file not found: {path!r}')
    need_file('data.bpe_path', cfg.data.bpe_path)
    if cfg.data.eda and cfg.data.eda_synonyms:
        need_file('data.synonyms_path (or set --config.data.eda_synonyms=False)', cfg.data.synonyms_path)
    if cfg.data.format == 'jsonl':
        metas, roots = data._split_list(cfg.data.train_meta), data._split_list(cfg.data.train_root)
        if not metas:
            raise ValueError('config.data.train_meta: no meta file given')
        for meta in metas:
            need_file('data.train_meta', meta)
        if len(roots) != len(metas):
            raise ValueError(f'config.data.train_root: {len(roots)} roots for {len(metas)} meta files')
    elif cfg.data.format == 'wds':
        import glob
        if not any(glob.glob(p) for p in data._split_list(cfg.data.shards)):
            raise ValueError(f'config.data.shards: no file matches {cfg.data.shards!r}')
    else:
        raise ValueError(f'config.data.format: "jsonl" or "wds", got {cfg.data.format!r}')
    if cfg.data.val_meta:
        need_file('data.val_meta', cfg.data.val_meta)
    if cfg.data.context_length != cfg.model.context_length:
        raise ValueError(f'config.data.context_length ({cfg.data.context_length}) must equal '
                         f'config.model.context_length ({cfg.model.context_length})')
    views = cfg.data.views
    if cfg.model.declip and (views != 2 or not cfg.data.mask):
        raise ValueError('config.model.declip needs data.views=2 and data.mask=True')
    precision(cfg.precision, 'cpu')
    if str(cfg.compile).lower() not in ('auto', 'true', 'false'):
        raise ValueError(f'config.compile: auto, true or false, got {cfg.compile!r}')
    if cfg.data.decode not in ('host', 'device'):
        raise ValueError(f'config.data.decode: "host" or "device", got {cfg.data.decode!r}')
    if cfg.data.decode == 'device':
        data.nvjpeg_decoder('cpu')  # torchvision must be importable before any work starts


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------

def build_model(cfg, device):
    """cfg.model on `device` as the step runs it: channels-last ResNet on accelerators, logit
    scale clamped, both towers compiled when config.compile says so ('auto': on CUDA)."""
    model = declip.build_model(cfg.model).to(device)
    if cfg.model.vision == 'resnet' and device.type != 'cpu':
        model = model.to(memory_format=torch.channels_last)
    model.clamp_logit_scale_()
    mode = str(cfg.compile).lower()
    if mode == 'true' or (mode == 'auto' and device.type == 'cuda'):
        compile_encoders(model)
    return model


def build_optimizer(model, optim, device_type):
    """AdamW over the reference's parameter groups; fused where torch has it, so a step can be
    skipped on the device (found_inf)."""
    return torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.base_lr,
                             betas=(optim.beta1, optim.beta2), eps=optim.eps,
                             fused=device_type in ('cuda', 'cpu'))


def compile_encoders(model):
    """torch.compile the towers in place (state-dict names unchanged)."""
    model.visual.compile()
    model.encode_text.compile()


def peak_memory_gib(device_type):
    if device_type == 'cpu':
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return torch.accelerator.max_memory_allocated() / 2 ** 30


def zero_shot(model, cfg, device, autocast, rank, world):
    model.eval()
    try:
        return evaluate.evaluate(model, val_root=cfg.data.val_root, val_meta=cfg.data.val_meta, task='zeroshot',
                                 prompts=cfg.eval.prompts, class_names=None, batch=cfg.eval.batch_size,
                                 workers=cfg.eval.workers, device=device, autocast=autocast, rank=rank,
                                 world=world, image_size=cfg.eval.image_size, resize=cfg.eval.resize)
    finally:
        model.train()


def train(cfg, workdir):
    rank, world, local_rank = dist_env()
    check_config(cfg)
    device, device_type = setup_device(local_rank)
    if world > 1:
        init_distributed(device_type, rank, world, cfg.dist_timeout_s)
    try:
        return _train(cfg, Path(workdir), rank, world, local_rank, device, device_type)
    finally:
        finish_distributed()


def _train(cfg, workdir, rank, world, local_rank, device, device_type):
    is_main = rank == 0
    ckpt_dir = workdir / 'checkpoints'
    if is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob('*.tmp'):  # a write interrupted by a crash
            stale.unlink()

    # Model, optimiser, NN queue (identical initial weights on every rank: same seed).
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, device)
    _, autocast, use_scaler = precision(cfg.precision, device_type)
    opt = build_optimizer(model, cfg.optim, device_type)
    fused = opt.defaults['fused']
    scaler = torch.amp.GradScaler(device_type, enabled=use_scaler)
    use_queue = cfg.model.declip and cfg.loss.nn > 0
    queue = losses.init_queue(cfg.loss.queue_size, cfg.model.embed_dim, device=device,
                              generator=torch.Generator().manual_seed(cfg.seed * 1000 + rank)) if use_queue else None
    queue_ptr, start = 0, 0

    path, state = find_checkpoint(ckpt_dir)
    if state is not None:
        model.load_state_dict(state['model'])
        opt.load_state_dict(state['optimizer'])
        if state['scaler']:
            scaler.load_state_dict(state['scaler'])
        start, queue_ptr = state['step'], state['queue_ptr']
        if state['world_size'] != world:
            logging.warning('resuming a %d-process run with %d processes: data order and NN queues of '
                            'ranks >= %d change', state['world_size'], world, state['world_size'])
        if use_queue and rank < len(state['queues']):
            queue = state['queues'][rank].to(device)
        torch.set_rng_state(state['rng'])
        if is_main:
            logging.info('resumed from %s at step %d', path, start)
    weights = {k: cfg.loss[k] for k in ('clip', 'simsiam', 'mlm', 'nn')}
    ddp = model
    if world > 1:  # a DeCLIP head whose loss weight is 0 gets no gradient
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device_type == 'cuda' else None,
            find_unused_parameters=cfg.model.declip and not all(weights[k] for k in ('simsiam', 'mlm')))

    loader = data.build_train_loader(cfg.data, rank=rank, world=world, start_step=start, max_iter=cfg.max_iter,
                                     pin_memory=device_type != 'cpu')
    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(workdir / 'tb'), purge_step=start + 1)  # steps are logged 1-based

    batch_images = cfg.data.batch_size * world
    sums, count, good = {}, 0, torch.zeros((), device=device)
    nonfinite_run = torch.zeros((), dtype=torch.long, device=device)
    nonfinite_total = torch.zeros((), dtype=torch.long, device=device)
    bad_totals = torch.zeros(len(data.BAD_KINDS), dtype=torch.long)
    if state is not None:  # counters continue across restarts (bad samples: all ranks' sum, kept by rank 0)
        nonfinite_total += state['nonfinite_total']
        if is_main:
            bad_totals += torch.tensor(state['bad_totals'])

    def all_bad_totals():
        """Bad-sample counts summed over ranks (each rank's loader counts its own)."""
        counts = bad_totals.to(device)
        if world > 1:
            dist.all_reduce(counts)
        return counts.cpu()
    t_last, t_data, flops_per_step = time.perf_counter(), 0.0, None
    it = iter(loader)

    def save(step):
        """All ranks send their queue to rank 0, which writes last.pt (and a kept copy)."""
        bad = all_bad_totals()
        queues = []
        if use_queue:
            queues = [torch.empty_like(queue) for _ in range(world)] if is_main else None
            if world > 1:
                dist.gather(queue, queues, dst=0)
            else:
                queues = [queue]
        if is_main:
            state = {'model': model.state_dict(), 'optimizer': opt.state_dict(), 'scaler': scaler.state_dict(),
                     'step': step, 'queues': [q.cpu() for q in queues], 'queue_ptr': queue_ptr,
                     'rng': torch.get_rng_state(), 'config': cfg.to_dict(), 'world_size': world,
                     'nonfinite_total': int(nonfinite_total), 'bad_totals': bad.tolist()}
            save_checkpoint(ckpt_dir / 'last.pt', state)
            if step % cfg.keep_every == 0 or step == cfg.max_iter:
                save_checkpoint(ckpt_dir / f'step_{step}.pt', state)
                prune_copies(ckpt_dir, cfg.keep_copies)

    end = min(cfg.stop_at, cfg.max_iter) if cfg.stop_at else cfg.max_iter
    for step in range(start, end):
        # 1. the loader's uint8 views, (masked) captions, MLM positions, EDA captions
        t0 = time.perf_counter()
        batch = next(it)
        t_data += time.perf_counter() - t0
        bad_totals += batch['bad']
        for group in opt.param_groups:
            group['lr'] = lr_at(step + 1, cfg.optim, cfg.max_iter)

        # 2. (data.decode='device': JPEG decode, crop, resize) colour jitter / grayscale / blur /
        #    normalise on the device, per sample
        if 'jpeg' in batch:
            images, undecodable = data.decode_views(batch, size=cfg.data.image_size, device=device)
            bad_totals[data.BAD_KINDS.index('truncated')] += undecodable
        else:
            images = batch['images'].to(device, non_blocking=True)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * world + rank)
        views = data.device_augment(rearrange(images, 'b v c h w -> (b v) c h w'), generator=gen)
        views = rearrange(views, '(b v) c h w -> b v c h w', v=images.shape[1])
        if writer is not None and step == start and cfg.tb_images:
            for v in range(views.shape[1]):
                writer.add_images(f'views/{v}', data.denormalize_images(views[:cfg.tb_images, v].float()).cpu(), step)
        text = batch['text'].to(device, non_blocking=True)
        text_eda = batch['text_eda'].to(device, non_blocking=True) if 'text_eda' in batch else None
        mlm_index = batch['mlm_index'].to(device, non_blocking=True) if 'mlm_index' in batch else None
        mlm_targets = batch['mlm_targets'].to(device, non_blocking=True) if 'mlm_targets' in batch else None

        flop_counter = None
        if cfg.peak_tflops and flops_per_step is None:
            from torch.utils.flop_counter import FlopCounterMode
            flop_counter = FlopCounterMode(display=False)
        count_flops = flop_counter is not None
        with flop_counter or contextlib.nullcontext():
            # 3. features of both views and both captions (+ masked-token logits, SimSiam heads)
            with autocast:
                out = ddp(views, text, text_eda=text_eda, mlm_index=mlm_index)
            # 4. weighted DeCLIP objective; the queue is looked up, then pushed
            ptr_before = queue_ptr
            saved_rows = None
            if use_queue:
                n_push = text.shape[0] * (2 if text_eda is not None else 1)
                saved_rows = queue[ptr_before:ptr_before + n_push].clone()
            total, terms, queue, queue_ptr = losses.declip_loss(
                out, queue=queue, queue_ptr=queue_ptr, mlm_targets=mlm_targets, weights=weights)
            if _injected_nonfinite(step):
                total = total * float('nan')
            # a non-finite loss on any rank skips the step everywhere, without a host sync
            bad_step = (~torch.isfinite(total.detach())).to(torch.float32)
            if world > 1:
                dist.all_reduce(bad_step, op=dist.ReduceOp.MAX)
            # 5. backward, optimiser step (skipped on device when bad_step), logit-scale clamp
            scaler.scale(total).backward()
        if count_flops:
            flops_per_step = flop_counter.get_total_flops()
        if use_queue:  # a skipped step leaves the queue's rows as they were
            rows = queue[ptr_before:ptr_before + saved_rows.shape[0]]
            rows.copy_(torch.where(bad_step > 0, saved_rows, rows))
        last = step + 1 == end
        log_now = (step + 1) % cfg.log_every == 0 or last
        grad_norm = None
        if log_now:
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        if use_scaler:
            scaler.step(opt)
            scaler.update()
        elif fused:
            opt.found_inf, opt.grad_scale = bad_step, None
            opt.step()
        elif not bad_step.item():  # optimisers without device-side skipping need the flag on the host
            opt.step()
        opt.zero_grad(set_to_none=True)
        model.clamp_logit_scale_()
        nonfinite_run = (nonfinite_run + 1) * bad_step.long()
        nonfinite_total += bad_step.long()
        for name, value in {'total': total.detach(), **terms}.items():
            sums[name] = sums.get(name, 0) + torch.where(bad_step > 0, 0.0, value.float())
        good += 1 - bad_step
        count += 1

        # 6. logging, checkpoints, zero-shot evaluation
        if log_now:
            run_len = int(nonfinite_run)
            if run_len:
                logging.warning('step %d: non-finite loss, step skipped (%d in a row)', step + 1, run_len)
            if run_len >= cfg.max_nonfinite:
                raise SystemExit(f'stopping: {run_len} consecutive non-finite losses at step {step + 1} '
                                 f'(config.max_nonfinite={cfg.max_nonfinite}); the last checkpoint in '
                                 f'{ckpt_dir} is intact')
            n_good = float(good)
            values = {k: float(v) / n_good for k, v in sums.items()} if n_good else {}
            bad = all_bad_totals()
            elapsed = time.perf_counter() - t_last
            step_s = elapsed / count
            img_s = batch_images / step_s
            if is_main:
                scalars = {f'loss/{k}': v for k, v in values.items()}
                scalars.update({
                    'train/lr': opt.param_groups[0]['lr'], 'train/logit_scale': model.logit_scale.exp().item(),
                    'train/grad_norm': float(grad_norm), 'train/nonfinite_steps': int(nonfinite_total),
                    'perf/img_per_s': img_s, 'perf/img_per_s_per_device': img_s / world,
                    'perf/step_ms': step_s * 1000, 'perf/data_wait_frac': t_data / elapsed,
                    'mem/peak_gib': peak_memory_gib(device_type)})
                if cfg.peak_tflops and flops_per_step:
                    scalars['perf/mfu'] = flops_per_step / step_s / (cfg.peak_tflops * 1e12)
                for kind, n in zip(data.BAD_KINDS, bad.tolist()):
                    scalars[f'data/bad_{kind}'] = n
                for k, v in scalars.items():
                    writer.add_scalar(k, v, step + 1)
                eta = datetime.timedelta(seconds=int(step_s * (end - step - 1)))
                print(f'step {step + 1}/{cfg.max_iter} | eta {eta} | {img_s:.1f} img/s | lr {scalars["train/lr"]:.2e} | '
                      + ' '.join(f'{k} {v:.4f}' for k, v in values.items()), flush=True)
            sums, count, t_data, t_last = {}, 0, 0.0, time.perf_counter()
            good.zero_()
        if (step + 1) % cfg.ckpt_every == 0 or last:
            save(step + 1)  # skipped steps changed nothing, so this is still the last good state
        if cfg.data.val_meta and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_iter):
            metrics = zero_shot(model, cfg, device, autocast, rank, world)
            if is_main:
                writer.add_scalar('eval/zeroshot_top1', metrics['zeroshot_top1'], step + 1)
                writer.add_scalar('eval/zeroshot_top5', metrics['zeroshot_top5'], step + 1)
                print(f'step {step + 1}: zero-shot top-1 {metrics["zeroshot_top1"]:.2f} '
                      f'top-5 {metrics["zeroshot_top5"]:.2f} ({metrics["images"]} images)', flush=True)
            t_last = time.perf_counter()
    if writer is not None:
        writer.close()
    return model


def main(argv):
    del argv
    if FLAGS.workdir is None:
        raise app.UsageError('--workdir is required')
    train(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
    config_flags.DEFINE_config_file('config', None, 'config file, e.g. configs/demo.py or configs/r50.py:smoke',
                                    lock_config=True)
    flags.DEFINE_string('workdir', None, 'where checkpoints/ and tb/ go; an existing run resumes')
    flags.mark_flag_as_required('config')
    app.run(main)
