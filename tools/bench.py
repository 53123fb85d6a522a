"""Speed and memory benchmarks; a table on stdout and JSON in --out.

    python tools/bench.py data                                   # host pipeline per core, device ops on CPU, meta index
    python tools/bench.py step --config=configs/vitb32.py --batch=256       # add --compile on CUDA, --decode=device
    python tools/bench.py scopes --config=configs/vitb32.py                 # eager vs each compile scope, one run
    python tools/bench.py parts --config=configs/r50.py --batch=256         # each speed choice vs its former form
    python tools/bench.py precision --config=configs/vitb32.py --batch=128  # bf16 losses against fp32
    python tools/bench.py saved --config=configs/vitb32.py                  # what a step keeps for backward
    python tools/bench.py e2e --workers=16 --step_ms=71                     # real loader over JPEG files

The mode comes first; flags a mode does not use are ignored. `step`, `scopes` and `precision` run the
loop's own step (accum.train_step with accum_steps > 1). Every mode runs on CPU in tiny settings (tests do).
`data` lives in bench_data.py, `parts` in bench_parts.py, `memory` and `saved` in bench_memory.py.
"""
import ast
import gc
import json
import os
import platform
import random
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the library beside tools/, run as a script

import accum  # noqa: E402
import data  # noqa: E402
import guard  # noqa: E402
import images  # noqa: E402
import jpeg  # noqa: E402
import loader  # noqa: E402
import runtime  # noqa: E402
import text  # noqa: E402
import trainstep  # noqa: E402
from tools import bench_data, bench_memory, bench_parts  # noqa: E402

FLAGS = flags.FLAGS
BENCH_IMAGES = data.ROOT.parent / 'shared' / 'bench_images'


def _synthetic_batch(cfg, batch, device, seed=0):
    """uint8 views, captions with eot, EDA captions and MLM positions, as the loader yields them."""
    g = torch.Generator().manual_seed(seed)
    size, length, views = cfg.model.image_size, cfg.model.context_length, cfg.data.views
    tokens = torch.randint(1, 40_000, (batch, length), generator=g)
    tokens[:, 0] = text.SOT_ID
    tokens[:, length // 2] = text.EOT_ID
    tokens[:, length // 2 + 1:] = 0
    out = {'images': torch.randint(0, 256, (batch, views, 3, size, size), dtype=torch.uint8, generator=g)}
    if cfg.data.mask:
        tokens, labels = text.mask_tokens(tokens, generator=g)
        out['mlm_index'], out['mlm_targets'] = text.mlm_positions(labels)
    out['text'] = tokens
    if cfg.data.eda:
        out['text_eda'] = tokens.roll(1, dims=0)
    return {k: v.to(device) for k, v in out.items()}


def matmul_peak_tflops(device, dtype, n):
    """Measured dense matmul throughput (the MFU denominator), TFLOP/s."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for reps in (3, 10):  # warm-up, then timed
        runtime.synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        runtime.synchronize(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e12


def trainer(cfg, device):
    """step(batch) -> its loss: the loop's step on build_state's fresh state; each call the next step."""
    state = trainstep.build_state(cfg, device)
    step = accum.step_for(cfg)
    return lambda batch: step(state, batch, cfg)['loss']['total']


def _jpeg_batch(cfg, batch, folder):
    """A device-decode batch (JPEG bytes, boxes, flips) of `batch` files from `folder`, cycled."""
    raws = [f.read_bytes() for f in bench_data.image_files(folder, batch)]
    raws = [(raw, *guard.open_image(raw, 1 << 30).size) for raw in raws]
    crops = dict(views=cfg.data.views, scale=tuple(cfg.data.crop_scale), flip=images.moco_views(cfg.data.augmentation))
    return jpeg.collate_jpeg([jpeg.jpeg_sample(*raws[i % len(raws)], random.Random(i), **crops)
                                for i in range(batch)])


def _host_syncs(step, device_type):
    """Whether one step synchronises with the host: the device module's sync debug mode (CUDA,
    torch_npu) raises if it does; None where there is none (CPU)."""
    module = torch.get_device_module(device_type) if device_type != 'cpu' else None
    if not hasattr(module, 'set_sync_debug_mode'):
        return None
    module.set_sync_debug_mode('error')
    try:
        step()
        return False
    except RuntimeError:
        return True
    finally:
        module.set_sync_debug_mode('default')


def _time_step(step, device, warmup, steps):
    """(seconds per step, FLOPs of one step, whether a step synchronises with the host); the peak
    memory is the timed steps' (the FLOP count runs one step eager, whose peak is not the compiled one's)."""
    for _ in range(warmup):
        step()
    with runtime.flop_counter() as counter:
        step()
    syncs = _host_syncs(step, device.type)
    runtime.synchronize(device)
    runtime.reset_peak_memory(device.type)
    start = time.perf_counter()
    for _ in range(steps):
        total = step()
    float(total)
    runtime.synchronize(device)
    return (time.perf_counter() - start) / steps, counter.get_total_flops(), syncs


def bench_step(args):
    """Throughput of the loop's step on one synthetic in-memory batch (with --decode=device its
    JPEG bytes: decode, crop and resize happen in the step); FLOPs counted by torch."""
    cfg = _step_config(args, compile=args.compile)
    device, device_type = runtime.setup_device(0)
    batch = _synthetic_batch(cfg, args.batch, device)
    if args.decode == 'device':
        batch = {**{k: v for k, v in batch.items() if k != 'images'}, **_jpeg_batch(cfg, args.batch, args.images)}
    step = trainer(cfg, device)
    step_s, flops, syncs = _time_step(lambda: step(batch), device, args.warmup, args.steps)
    peak = matmul_peak_tflops(device, torch.bfloat16 if device_type != 'cpu' else torch.float32,
                              args.matmul_n or (8192 if device_type != 'cpu' else 1024))
    mem, tflops = runtime.peak_memory_gib(device_type), flops / step_s / 1e12
    result = {'config': args.config, 'batch': args.batch, 'device': str(device), 'precision': args.precision,
              'compile': trainstep.compile_scope(cfg.runtime.compile, device_type), 'decode': args.decode, 'img_per_s': args.batch / step_s,
              'step_ms': step_s * 1000, 'tflops': tflops, 'matmul_peak_tflops': peak, 'mfu': tflops / peak,
              'peak_mem_gib': mem, 'flops_per_step': flops, 'host_syncs_in_step': syncs}
    label = f'{args.config} batch {args.batch} {args.precision}' + f' compiled ({result["compile"]})' * bool(result['compile'])
    rows = [(label + ' device JPEG decode' * (args.decode == 'device'),
             f'{result["img_per_s"]:.1f} img/s', f'{result["step_ms"]:.1f} ms/step',
             f'{tflops:.2f} TFLOP/s', f'MFU {result["mfu"]:.1%}', f'{mem:.2f} GiB')]
    return rows, result


def bench_precision(args):
    """Low precision against fp32 from the same initial weights over the same batches (the same
    step the loop runs): every loss finite, and the first --compare losses within --rtol of fp32's."""
    device, _ = runtime.setup_device(0)
    names = ('fp32', args.precision if args.precision != 'auto' else 'bf16')
    runs = {}
    for name in names:
        cfg = _load_config(args.config, compile=args.compile, precision=name)
        step = trainer(cfg, device)
        runs[name] = torch.stack([step(_synthetic_batch(cfg, args.batch, device, seed=t))
                                  for t in range(args.steps)]).float().cpu()
    (ref, low), k = runs.values(), min(args.compare, args.steps)
    rel = ((low[:k] - ref[:k]).abs() / ref[:k].abs()).max().item()
    finite = bool(torch.isfinite(low).all() and torch.isfinite(ref).all())
    ok = finite and rel <= args.rtol
    result = {'config': args.config, 'batch': args.batch, 'device': str(device), 'steps': args.steps,
              'compare': k, 'rtol': args.rtol, 'max_rel_diff': rel, 'finite': finite, 'ok': ok,
              'losses': {name: runs[name].tolist() for name in names}}
    rows = [(f'{args.config} batch {args.batch}: {names[1]} vs fp32, {args.steps} steps',
             f'finite {"yes" if finite else "NO"}', f'max rel diff {rel:.2e} (first {k})',
             'ok' if ok else 'FAIL')]
    return rows, result


def _scope_run(args, scope, device, batches):
    """One scope of `scopes`: a fresh step, --warmup steps (compilation), --steps timed ones."""
    cfg = _step_config(args, compile=scope)
    step = trainer(cfg, device)
    start = time.perf_counter()
    losses = [step(batches[t % 3]) for t in range(args.warmup)]
    runtime.synchronize(device)
    runtime.reset_peak_memory(device.type)   # the timed steps' peak, not compilation's
    warm = time.perf_counter()
    losses += [step(batches[t % 3]) for t in range(args.warmup, args.warmup + args.steps)]
    runtime.synchronize(device)
    return {'compile': trainstep.compile_scope(cfg.runtime.compile, device.type), 'warmup_s': warm - start,
            'step_ms': (time.perf_counter() - warm) / args.steps * 1000,
            'peak_mem_gib': runtime.peak_memory_gib(device.type),
            'host_syncs_in_step': _host_syncs(lambda: step(batches[0]), device.type),
            'losses': torch.stack(losses).float().cpu().tolist()}


def bench_scopes(args):
    """The loop's step under each compile scope of --scopes, from the same initial weights over the
    same batches (three, cycled: the masked-token counts differ), one after the other in one process:
    seconds of the first --warmup steps (compilation), ms/step after them as a ratio to the first
    scope's, each scope's largest relative loss difference from the first scope's over all steps,
    peak memory (on CPU the process's peak RSS, which only grows) and whether a step syncs with the
    host. --out gets the scopes done so far after each one (a time limit may cut the next)."""
    device, _ = runtime.setup_device(0)
    cfg = _load_config(args.config, overrides=args.set)
    batches = [_synthetic_batch(cfg, args.batch, device, seed=t) for t in range(3)]
    runs = {}
    for scope in args.scopes:
        gc.collect()   # the previous scope's compiled model sits in a reference cycle: free it first
        runtime.empty_cache(device.type)
        runs[scope] = _scope_run(args, scope, device, batches)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({'mode': 'scopes', 'partial': True, 'scopes': runs}, indent=2))
    first = runs[args.scopes[0]]
    ref = torch.tensor(first['losses'])
    rows = []
    for scope, r in runs.items():
        r['ratio'] = first['step_ms'] / r['step_ms']
        r['max_rel_diff'] = ((torch.tensor(r['losses']) - ref).abs() / ref.abs()).max().item()
        rows.append((f'{args.config} batch {args.batch} compile={scope} ({r["compile"]})',
                     f'{r["step_ms"]:.1f} ms/step', f'x{r["ratio"]:.2f} speed', f'warm-up {r["warmup_s"]:.1f} s',
                     f'rel diff {r["max_rel_diff"]:.1e}', f'{r["peak_mem_gib"]:.2f} GiB',
                     f'host sync {r["host_syncs_in_step"]}'))
    return rows, {'config': args.config, 'batch': args.batch, 'device': str(device), 'precision': args.precision,
                  'steps': args.steps, 'warmup': args.warmup, 'scopes': runs}


def _load_config(spec, compile=False, precision=None, overrides=()):
    """A config file[:arg] as train.py takes it, compiled only with --compile, `precision` and
    `overrides` ('key.path=value', a Python literal) replacing the file's."""
    import importlib.util
    path, _, arg = spec.partition(':')
    module_spec = importlib.util.spec_from_file_location('bench_config', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(arg or None)
    cfg.runtime.compile = str(compile).lower()
    if precision:
        cfg.runtime.precision = precision
    for key, _, value in (item.partition('=') for item in overrides):
        parent, _, leaf = key.rpartition('.')
        (cfg[parent] if parent else cfg)[leaf] = ast.literal_eval(value)
    return cfg


def _step_config(args, compile=False):
    """--config with --precision and --set, its global batch --batch (micro-batches of batch / accum_steps)."""
    cfg = _load_config(args.config, compile=compile, precision=args.precision, overrides=args.set)
    cfg.data.batch_size = args.batch // cfg.accum_steps
    return cfg


def _e2e_once(args, root):
    """Pairs/s and data-wait fraction of one loader run."""
    cfg = _load_config(args.config)
    cfg.data.update(dict(train_root=str(root), train_meta=str(root / 'meta.jsonl'), workers=args.workers,
                         batch_size=args.batch, prefetch=args.prefetch, image_size=args.size, decode=args.decode,
                         eda_synonyms=Path(cfg.data.synonyms_path).is_file()))
    it = iter(loader.build_train_loader(cfg.data, rank=0, world=1, start_step=0,
                                        max_iter=args.warmup + args.steps, pin_memory=False))
    for _ in range(args.warmup):
        next(it)
    wait, start = 0.0, time.perf_counter()
    for _ in range(args.steps):
        t = time.perf_counter()
        next(it)
        wait += time.perf_counter() - t
        time.sleep(args.step_ms / 1000)
    elapsed = time.perf_counter() - start
    return args.steps * args.batch / elapsed, wait / elapsed


def bench_e2e(args):
    """The real loader over JPEG files, N workers, a consumer taking --step_ms per batch: pairs/s
    and the fraction of time it waited for data (median of --repeats runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        root, files = Path(tmp), bench_data.image_files(args.images, args.limit)
        for src in files:
            (root / src.name).symlink_to(src.resolve())
        (root / 'meta.jsonl').write_text(''.join(json.dumps({'filename': src.name, 'caption': f'a natural photo {i}'})
                                                 + '\n' for i, src in enumerate(files)))
        runs = sorted(_e2e_once(args, root) for _ in range(args.repeats))
    pairs, wait = runs[len(runs) // 2]
    result = {'workers': args.workers, 'batch': args.batch, 'decode': args.decode, 'pairs_per_s': pairs,
              'pairs_per_s_per_worker': pairs / max(args.workers, 1), 'data_wait_frac': wait,
              'step_ms': args.step_ms, 'size': args.size, 'runs': runs}
    rows = [(f'loader ({args.decode} decode), {args.workers} workers, batch {args.batch}, '
             f'consumer {args.step_ms:.0f} ms/step',
             f'{pairs:.1f} pairs/s', f'{result["pairs_per_s_per_worker"]:.1f} /worker', f'wait {wait:.1%}')]
    return rows, result


def _parts(args):
    """`parts` (bench_parts.py) on the config's model and a synthetic batch."""
    cfg = _load_config(args.config)
    device, _ = runtime.setup_device(0)
    return bench_parts.bench_parts(args, cfg=cfg, device=device, inputs=_synthetic_batch(cfg, args.batch, device))


def _saved(args):
    """`saved` (bench_memory.py) on the config's model and a synthetic batch."""
    cfg = _step_config(args)
    device, _ = runtime.setup_device(0)
    return bench_memory.bench_saved(args, cfg=cfg, device=device, batch=_synthetic_batch(cfg, args.batch, device))


def print_table(title, rows):
    width = max(len(r[0]) for r in rows)
    print(f'\n{title}', *(f'  {row[0]:<{width}}  ' + '  '.join(f'{c:>18}' for c in row[1:]) for row in rows), sep='\n')


MODES = {'data': bench_data.bench_data, 'step': bench_step, 'scopes': bench_scopes, 'precision': bench_precision,
         'parts': _parts, 'e2e': bench_e2e, 'memory': bench_memory.bench_memory, 'saved': _saved}
# The defaults that differ between modes: flags left unset (None or '') take their mode's value.
MODE_DEFAULTS = {'step': dict(batch=256, precision='auto', warmup=5, steps=20),
                 'scopes': dict(batch=256, precision='auto', warmup=3, steps=12),
                 'saved': dict(batch=256, precision='auto'),
                 'memory': dict(batch=64, warmup=2, steps=5), 'precision': dict(batch=128, precision='bf16', steps=50),
                 'parts': dict(batch=256, precision='auto'), 'e2e': dict(batch=256, warmup=2, steps=10)}


def define_flags():
    """bench.py's flags, defined once per process (main defines them when a test calls it)."""
    if 'matmul_n' in FLAGS:
        return
    flags.DEFINE_string('config', 'configs/vitb32.py', 'step, precision, parts, e2e: config file[:arg]')
    flags.DEFINE_integer('batch', None, 'pairs per step (default 256; precision: 128)')
    flags.DEFINE_string('precision', '', 'auto, bf16, fp16 or fp32 (default auto; precision: bf16, against fp32)')
    flags.DEFINE_boolean('compile', False, "step, precision: torch.compile (config.runtime.compile 'true'; "
                         "--set=compile=\"'model'\" picks a scope)")
    flags.DEFINE_list('scopes', ['false', 'model', 'step'], 'scopes: config.runtime.compile settings, the '
                      'first the reference')
    flags.DEFINE_integer('warmup', None, 'step, scopes, e2e: untimed steps first (default 5; scopes 3; e2e 2)')
    flags.DEFINE_integer('steps', None, 'step, scopes, precision, e2e: timed steps (default 20; scopes 12; '
                         'precision 50; e2e 10)')
    flags.DEFINE_enum('decode', 'host', ['host', 'device'], "step, e2e: 'device' decodes JPEG bytes in the step")
    flags.DEFINE_string('images', str(BENCH_IMAGES), 'data, e2e, step --decode=device: folder of .jpg files')
    flags.DEFINE_integer('limit', 240, 'data, e2e: at most this many images')
    flags.DEFINE_integer('matmul_n', 0, 'step: size of the MFU matmul (0: 8192 on accelerators, 1024 on CPU)')
    flags.DEFINE_integer('compare', 20, 'precision: steps whose losses must agree within --rtol')
    flags.DEFINE_float('rtol', 0.02, 'precision: largest relative loss difference allowed')
    flags.DEFINE_integer('rounds', 5, 'parts: rounds of alternating before/after calls')
    flags.DEFINE_float('seconds', 10.0, 'data: least seconds per host variant')
    flags.DEFINE_integer('device_pairs', 256, 'data: pairs through the device colour ops on CPU')
    flags.DEFINE_integer('index_lines', 1_000_000, 'data: lines of the generated meta file to index')
    flags.DEFINE_integer('workers', os.cpu_count(), 'e2e: loader workers')
    flags.DEFINE_integer('prefetch', 4, 'e2e: batches prefetched per worker')
    flags.DEFINE_integer('size', 224, 'e2e: view size')
    flags.DEFINE_float('step_ms', 0.0, 'e2e: milliseconds the consumer spends on each batch')
    flags.DEFINE_integer('repeats', 1, 'e2e: runs (the median is reported)')
    flags.DEFINE_multi_string('set', [], 'step, scopes, saved: config override key=value (e.g. accum_steps=4)')
    flags.DEFINE_integer('accum', 4, 'memory: micro-batches of the accumulation variant')
    flags.DEFINE_string('out', 'bench_out/bench.json', 'JSON output')


def run_mode(argv, command):
    """Run the mode named by argv (flags parsed already); returns its result dict."""
    if len(argv) != 1 or argv[0] not in MODES:
        raise app.UsageError(f'one mode: {", ".join(MODES)} (got {argv})')
    mode = argv[0]
    args = types.SimpleNamespace(**{f.name: f.value for f in FLAGS.get_flags_for_module(__name__)})
    for name, value in MODE_DEFAULTS.get(mode, {}).items():
        if getattr(args, name) in (None, ''):
            setattr(args, name, value)
    rows, result = MODES[mode](args)
    print_table(f'bench.py {mode}', rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {'machine': platform.machine(), 'cpu_count': os.cpu_count(), 'torch': torch.__version__,
               'python': platform.python_version(), 'date': time.strftime('%Y-%m-%d')}
    out.write_text(json.dumps({'mode': mode, 'argv': command, **machine, **result}, indent=2))
    return result


def main(argv):
    """A command line without the program name, e.g. ['step', '--config', 'configs/demo.py:smoke']:
    flags not given take their defaults. Returns the mode's result dict."""
    define_flags()
    FLAGS.unparse_flags()
    return run_mode(FLAGS(['bench.py', *argv])[1:], list(argv))


def _app_main(argv):
    """Under app.run (flags parsed); the exit status is non-zero when `precision` fails."""
    sys.exit(0 if run_mode(argv[1:], sys.argv[1:]).get('ok', True) else 1)


if __name__ == '__main__':
    define_flags()
    app.run(_app_main)
