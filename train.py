"""DeCLIP / CLIP pre-training: one explicit DDP loop with AMP, TensorBoard and exact resume.

    python train.py --config configs/demo.py --workdir runs/demo
    torchrun --nproc_per_node 8 train.py --config configs/vitb32.py --workdir runs/vitb32
    python train.py --config configs/r50.py:smoke --workdir /tmp/smoke --config.optim.warmup_lr=5e-4

A run resumes by itself from `workdir/checkpoints` (last.pt, else the newest kept copy).
"""
import contextlib
import datetime
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from absl import app, flags
from ml_collections import config_flags

import accum
import checkpoints
import checks
import data
import evaluate
import guard
import images
import lifecycle
import loader
import runtime
import trainstep
import weights

FLAGS = flags.FLAGS

# ----------------------------------------------------------------------------------------------
# Around the loop: DDP, logging, evaluation
# ----------------------------------------------------------------------------------------------

def wrap_ddp(state, cfg, world):
    """DDP over the model (several processes); a DeCLIP head whose loss weight is 0 gets no gradient."""
    if world == 1:
        return
    device = state.device
    terms = trainstep.loss_weights(cfg)
    state.ddp = torch.nn.parallel.DistributedDataParallel(
        state.model, device_ids=[device.index] if device.type == 'cuda' else None,
        find_unused_parameters=cfg.model.declip and not all(terms[k] for k in ('simsiam', 'mlm')))


def zero_shot(state, cfg, rank, world):
    """In-run zero-shot top-1/top-5 on every rank, in config.eval.precision (fp32 by default)."""
    model, (_, autocast, _) = state.model, runtime.precision(cfg.eval.precision, state.device.type)
    model.eval()
    try:
        return evaluate.evaluate(
            model, val_root=cfg.data.val_root, val_meta=cfg.data.val_meta, task='zeroshot',
            prompts=cfg.eval.prompts, class_names=None, batch=cfg.eval.batch_size, workers=cfg.eval.workers,
            device=state.device, autocast=autocast, rank=rank, world=world,
            tokenizer=data.get_tokenizer(cfg.data.bpe_path), max_file_bytes=cfg.data.limits.max_file_bytes,
            sample_timeout_s=cfg.data.limits.sample_timeout_s)
    finally:
        model.train()


class RunLog:
    """TensorBoard (rank 0), the console line and the running means between log steps."""

    def __init__(self, cfg, workdir, *, rank, world, start):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.writer, self.tb_dir = None, workdir / 'tb'
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            try:
                self.writer = SummaryWriter(str(self.tb_dir), purge_step=start + 1)  # steps are 1-based
            except OSError as e:
                self.tb_failed(e)
        self.flops_per_step = None
        self._reset()

    def tb(self, write):
        """write(the SummaryWriter) unless TensorBoard is off. A failed write (a full disk) ends
        TensorBoard logging with one warning: an auxiliary output never stops training."""
        if self.writer is not None:
            try:
                write(self.writer)
            except OSError as e:
                writer, self.writer = self.writer, None
                with contextlib.suppress(Exception):
                    writer.close()
                self.tb_failed(e)

    def tb_failed(self, error):
        print(f'warning: TensorBoard logging to {self.tb_dir} stops here ({error}); training goes on and checkpoints '
              f'are still written', file=sys.stderr, flush=True)

    def _reset(self):
        self.sums, self.good, self.count, self.t_data, self.t_last = {}, 0.0, 0, 0.0, time.perf_counter()

    def next_batch(self, batches):
        t0 = time.perf_counter()
        batch = next(batches)
        self.t_data += time.perf_counter() - t0
        return batch

    def flop_counter(self):
        """Counts the FLOPs of the first step when an MFU figure is wanted (config.runtime.peak_tflops)."""
        if not self.cfg.runtime.peak_tflops or self.flops_per_step is not None:
            return None
        return runtime.flop_counter()

    def wants_views(self):
        return self.writer is not None and self.cfg.runtime.tb_images > 0

    def views(self, views, step):
        """A step's augmented views [B, V, 3, S, S], as images."""
        for v in range(views.shape[1]):
            shown = images.denormalize_images(views[:self.cfg.runtime.tb_images, v].float()).cpu()
            self.tb(lambda w: w.add_images(f'views/{v}', shown, step))

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
        img_s = self.cfg.data.batch_size * self.cfg.accum_steps * self.world / step_s
        if self.rank == 0:
            scalars = {f'loss/{k}': v for k, v in values.items()}
            scalars.update({
                'train/lr': state.optimizer.param_groups[0]['lr'],
                'train/logit_scale': state.model.logit_scale.exp().item(),
                'train/grad_norm': float(metrics['grad_norm']), 'train/nonfinite_steps': int(state.nonfinite_total),
                'perf/img_per_s': img_s, 'perf/img_per_s_per_device': img_s / self.world,
                'perf/step_ms': step_s * 1000, 'perf/data_wait_frac': self.t_data / elapsed,
                'mem/peak_gib': runtime.peak_memory_gib(state.device.type)})
            if self.cfg.runtime.peak_tflops and self.flops_per_step:
                scalars['perf/mfu'] = self.flops_per_step / step_s / (self.cfg.runtime.peak_tflops * 1e12)
            scalars['samples/bad_total'] = int(bad.sum())   # each kind once it occurs (after losses in the list)
            scalars.update({f'samples/{kind}': n for kind, n in guard.by_kind(bad).items() if n})
            self.tb(lambda w: [w.add_scalar(k, v, step) for k, v in scalars.items()])
            eta = datetime.timedelta(seconds=int(step_s * (end - step)))
            print(f'step {step}/{self.cfg.max_iter} | eta {eta} | {img_s:.1f} img/s | lr {scalars["train/lr"]:.2e} | '
                  + ' '.join(f'{k} {v:.4f}' for k, v in values.items()) + time.strftime(' | %H:%M:%S'), flush=True)
        self._reset()

    def evaluation(self, metrics, step):
        if self.rank == 0:
            skipped = metrics.get('images_skipped', 0)
            self.tb(lambda w: [w.add_scalar(f'eval/{k}', metrics.get(k, 0), step)
                               for k in ('zeroshot_top1', 'zeroshot_top5', 'images_skipped')])
            print(f'step {step}: zero-shot top-1 {metrics["zeroshot_top1"]:.2f} top-5 {metrics["zeroshot_top5"]:.2f} '
                  f'({metrics["images"]} images' + (f', {skipped} unreadable skipped)' if skipped else ')'), flush=True)
        self.t_last = time.perf_counter()

    def close(self):
        self.tb(lambda w: w.close())


def due(step, every):
    return step % every == 0


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------

def train(cfg, workdir, *, start_over=False, allow_config_change=False):
    """Check the config, set up device and processes, hold the workdir, run the loop; returns
    the model."""
    with checks.config_errors():
        checks.check_config(cfg)
    lifecycle.exit_with_parent()
    device, device_type = runtime.setup_device(runtime.dist_env()[2], cfg.runtime.device)
    workdir, first = Path(workdir), runtime.dist_env()[0] == 0
    with checks.config_errors():
        checks.check_device(cfg, device_type)
        lifecycle.prepare_workdir(workdir, create=first)   # the first process makes it
    jit, static = runtime.configure_shapes(device_type, jit_compile=cfg.runtime.npu_jit_compile,
                                           static_shapes=cfg.runtime.static_shapes)
    with (lifecycle.workdir_lock(workdir) if first else contextlib.nullcontext()), \
            runtime.processes(device_type, cfg.runtime.dist_timeout_s) as (rank, world):
        if rank == 0:
            dtype = runtime.precision(cfg.runtime.precision, device_type)[0]
            backend = dist.get_backend() if dist.is_initialized() else 'none (one process)'
            npu = f' | jit compile {jit}' if jit is not None else ''
            print(f'device {device} | backend {backend} | precision {dtype} | world size {world} | '
                  f'static shapes {static}{npu}', flush=True)
        state = trainstep.build_state(cfg, device, rank)
        state.static_shapes, state.bad_totals = static, guard.bad_counts([])   # one count per kind the loader knows
        dataset = loader.train_dataset(cfg.data)   # indexed once, before resuming: its identity is compared
        state.inputs = checkpoints.run_identity(cfg, world, loader.data_identity(cfg.data, dataset))
        checkpoints.resume(state, cfg, workdir / 'checkpoints', world, start_over=start_over, allow_change=allow_config_change)
        start = f'resumed at step {state.step}' if state.step else init_weights(state, cfg)
        wrap_ddp(state, cfg, world)
        if rank == 0:
            (workdir / 'config.json').write_text(cfg.to_json_best_effort(indent=2))
            print(summary(state, cfg, world, start), flush=True)
        return run(state, cfg, workdir, rank, world, dataset)


def init_weights(state, cfg):
    """config.init_from into a fresh run: the tensors the file has; heads it lacks keep their
    initialisation. Returns how the run starts, for the summary."""
    if not cfg.init_from:
        return 'fresh weights'
    tensors, _ = weights.load_weights(cfg.init_from, act=cfg.model.act)
    try:
        missing, unexpected = state.model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:
        raise ValueError(f'config.init_from: {cfg.init_from} does not fit config.model: {str(e)[:600]}') from None
    fresh = sorted({k.split('.')[0] for k in missing})
    return (f'initialised from {cfg.init_from} ({len(tensors) - len(unexpected)} tensors'
            + (f'; fresh: {", ".join(fresh)}' if fresh else '') + ')')


def summary(state, cfg, world, start):
    """The run in two lines: parallelism, batch, parameters, where it starts (and a warning when one
    step's global batch is more than the whole training set)."""
    params = {}
    for name, p in state.model.named_parameters():
        part = name.split('.')[0]
        params[part] = params.get(part, 0) + p.numel()
    counts = ', '.join(f'{k} {v / 1e6:.2f}M' for k, v in params.items())
    batch = cfg.data.batch_size * cfg.accum_steps * world
    records = state.inputs['training_data'].get('records', batch)   # shards: not counted
    warn = (f'\nwarning: the global batch ({batch}) is larger than the training set ({records} records): every '
            f'step holds some samples twice' if batch > records else '')
    return (f'global batch {batch} = {world} processes x {cfg.accum_steps} micro-batches x {cfg.data.batch_size} | '
            f'{cfg.max_iter} steps | {cfg.data.format} data\nparameters {sum(params.values()) / 1e6:.2f}M '
            f'({counts}) | {start}{warn}')


def end_step(cfg):
    """The step this invocation ends at."""
    return min(cfg.stop_at or cfg.max_iter, cfg.max_iter)


def eval_due(step, cfg):
    return bool(cfg.data.val_meta) and step > 0 and (due(step, cfg.eval_every) or step == cfg.max_iter)


def run(state, cfg, workdir, rank, world, dataset=None):
    """The loop: a step, then logging, checkpoint and evaluation when due. A signal stops it after
    the step all ranks agree on, with a checkpoint; an evaluation that a crash interrupted runs
    again first on resume (the checkpoint before it was written first). `dataset`:
    loader.train_dataset's, if built."""
    ckpt_dir = workdir / 'checkpoints'
    if rank == 0:
        for stale in ckpt_dir.glob('*.tmp'):  # a write interrupted by a crash (the lock says it is no one's)
            stale.unlink()
    start, end = state.step, end_step(cfg)
    if start >= end:
        if rank == 0:
            print(f'nothing to do: the run is at step {start} and this invocation ends at step {end} '
                  f'(stop_at={cfg.stop_at}, max_iter={cfg.max_iter})', flush=True)
        return state.model
    batches = iter(loader.build_train_loader(cfg.data, rank=rank, world=world, start_step=start,
                                             max_iter=cfg.max_iter, pin_memory=state.device.type != 'cpu',
                                             accum=cfg.accum_steps, dataset=dataset))
    log = RunLog(cfg, workdir, rank=rank, world=world, start=start)
    try:
        stopping, received = loop(state, cfg, batches, log, ckpt_dir, rank, world)
    finally:  # on an error too: loader workers end here, not at interpreter exit
        lifecycle.release_loader(batches)
        log.close()
    if stopping:
        raise SystemExit(f'stopped at step {state.step} ({received or "signal on another rank"}); the '
                         f'checkpoint is written: run the same command to resume')
    return state.model


def next_batch(state, cfg, log, batches, deaths, ckpt_dir, world):
    """The step's batch. A loader worker that died or stopped responding (torch's RuntimeError)
    stops the run here, between steps, with a checkpoint of the steps trained; with several
    processes the others cannot join that save, and the last checkpoint stays."""
    try:
        deaths.check()
        return log.next_batch(batches)
    except RuntimeError as e:
        cause = lifecycle.loader_fault(e, cfg.data.limits.batch_timeout_s)
        if cause is None:
            raise
    if world > 1:
        raise SystemExit(f'stopped at step {state.step}: {cause}; the last checkpoint in {ckpt_dir} stays')
    checkpoints.save(state, cfg, ckpt_dir)
    raise SystemExit(f'stopped at step {state.step}: {cause}; the checkpoint is written: run the same command to '
                     f'resume')


def loop(state, cfg, batches, log, ckpt_dir, rank, world):
    """Steps from state.step to the end of this invocation; (stopped by a signal, its name)."""
    marker, start, end = ckpt_dir / 'evaluated_step', state.step, end_step(cfg)
    step = accum.step_for(cfg)

    def evaluation():
        log.evaluation(zero_shot(state, cfg, rank, world), state.step)
        if rank == 0:
            marker.write_text(str(state.step))

    if eval_due(start, cfg) and (not marker.is_file() or marker.read_text().strip() != str(start)):
        evaluation()
    with lifecycle.StopSignals() as signals, lifecycle.WorkerDeaths() as deaths:
        stop, stopping = None, False
        while state.step < end and not stopping:
            batch = next_batch(state, cfg, log, batches, deaths, ckpt_dir, world)
            log_now = due(state.step + 1, cfg.log_every) or state.step + 1 == end
            counter = log.flop_counter()
            state.stop_requested = signals.received is not None   # every rank learns it from the step
            with counter or contextlib.nullcontext():
                metrics = step(state, batch, cfg)
            if counter is not None:
                log.flops_per_step = counter.get_total_flops()
            if state.step == start + 1 and log.wants_views():
                log.views(metrics['views'], start)
            del metrics['views']   # the next step does not hold this one's images
            log.add(metrics)
            if log_now:
                lifecycle.stop_if_diverged(state, cfg, ckpt_dir)
                log.log(state, metrics, end)
            stopping = stop is not None and bool(stop)   # the previous step's flag, the same on every rank
            stop = metrics['stop']
            if due(state.step, cfg.ckpt_every) or state.step == end or eval_due(state.step, cfg) or stopping:
                checkpoints.save(state, cfg, ckpt_dir)  # skipped steps changed nothing: still the last good state
            if eval_due(state.step, cfg) and not stopping:
                evaluation()
    return stopping, signals.received


def main(argv):
    del argv
    if FLAGS.workdir is None and not FLAGS.print_config:
        raise app.UsageError('--workdir is required')
    if FLAGS.print_config:
        print(FLAGS.config)
        return
    try:
        train(FLAGS.config, FLAGS.workdir, start_over=FLAGS.start_over, allow_config_change=FLAGS.allow_config_change)
    except (checks.ConfigError, checkpoints.ResumeRefused) as e:
        # one message per machine, no traceback: its first process prints it and fails the launch; the
        # others leave quietly (had they failed first, the launcher could stop the first before it printed)
        raise SystemExit(f'config error: {e}' if runtime.dist_env()[2] == 0 else 0) from None
    except guard.DataError as e:   # the corpus, named by its examples; a traceback would bury them
        raise SystemExit(f'data error: {guard.error_message(e)}') from None


if __name__ == '__main__':
    config_flags.DEFINE_config_file('config', None, 'config file, e.g. configs/demo.py or configs/r50.py:smoke',
                                    lock_config=True)
    flags.DEFINE_string('workdir', None, 'where checkpoints/ and tb/ go; an existing run resumes')
    flags.DEFINE_bool('start_over', False, 'when no checkpoint of the workdir can be read, rename them '
                      '*.unreadable and start from step 0 (otherwise that is an error)')
    flags.DEFINE_bool('allow_config_change', False, 'resume even if the config changes the model, losses, '
                      'optimiser, schedule, batch size or data')
    flags.DEFINE_bool('print_config', False, 'print every config key with its value (defaults and overrides) and exit')
    flags.mark_flag_as_required('config')
    app.run(main)
