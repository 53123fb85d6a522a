"""Speed and memory benchmarks; a table on stdout and JSON in --out.

    python bench.py data                       # host pipeline variants per core, device ops on CPU, meta index
    python bench.py step --config configs/vitb32.py --batch 256      # add --compile on CUDA, --decode device
    python bench.py parts --config configs/r50.py --batch 256        # each speed choice vs its former form
    python bench.py precision --config configs/vitb32.py --batch 128 # bf16 losses against fp32
    python bench.py e2e --workers 16 --step-ms 71                     # real loader over JPEG files

Every mode also runs on CPU with tiny settings so that tests can smoke it (not time it).
"""
import argparse
import copy
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

import data
import losses

ROOT = Path(__file__).resolve().parent
BENCH_IMAGES = ROOT.parent / 'shared' / 'bench_images'


def _machine():
    return {'machine': platform.machine(), 'cpu_count': os.cpu_count(), 'torch': torch.__version__,
            'python': platform.python_version(), 'date': time.strftime('%Y-%m-%d')}


def _image_files(folder, limit):
    files = sorted(Path(folder).glob('*.jpg'))[:limit]
    if not files:
        raise FileNotFoundError(f'no .jpg files in {folder} (--images)')
    return files


def _images(folder, limit):
    return [f.read_bytes() for f in _image_files(folder, limit)]


def _rates(fns, items, min_seconds, chunk=20):
    """Items per second of each fn over `items`, the variants taking turns in chunks of `chunk`
    items until each has run min_seconds, so that a machine's speed drift hits them all alike."""
    spent, done = dict.fromkeys(fns, 0.0), dict.fromkeys(fns, 0)
    while min(spent.values()) < min_seconds:
        for i in range(0, len(items), chunk):
            for name, fn in fns.items():
                start = time.perf_counter()
                for item in items[i:i + chunk]:
                    fn(item)
                spent[name] += time.perf_counter() - start
                done[name] += len(items[i:i + chunk])
    return {name: done[name] / spent[name] for name in fns}


def pil_views(raw, rng, size=224):
    """The previous CPU part, for comparison: like data.train_views, but Pillow's crop + BILINEAR
    resize + flip (torchvision's RandomResizedCrop on PIL images, exactly)."""
    from PIL import Image
    img = data.to_rgb(data.open_image(raw, 1 << 30))
    out = torch.empty(2, 3, size, size, dtype=torch.uint8)
    for v in range(2):
        left, top, w, h = data.rrc_params(img.width, img.height, rng)
        view = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
        if rng.random() < 0.5:
            view = view.transpose(Image.FLIP_LEFT_RIGHT)
        out[v] = data._to_chw(view)
    return out


def moco_pil_views(raw, rng, size=224):
    """The reference's host pipeline, for comparison only: MoCo v2 entirely in Pillow/numpy,
    two views, float normalised output (what torchvision's transforms do on PIL images)."""
    import io

    import numpy as np
    from PIL import Image, ImageEnhance, ImageFilter
    img = Image.open(io.BytesIO(raw)).convert('RGB')
    out = []
    for _ in range(2):
        left, top, w, h = data.rrc_params(img.width, img.height, rng)
        v = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
        if rng.random() < 0.8:
            ops = [lambda x: ImageEnhance.Brightness(x).enhance(rng.uniform(0.6, 1.4)),
                   lambda x: ImageEnhance.Contrast(x).enhance(rng.uniform(0.6, 1.4)),
                   lambda x: ImageEnhance.Color(x).enhance(rng.uniform(0.6, 1.4)),
                   lambda x: pil_hue(x, rng.uniform(-0.1, 0.1))]
            rng.shuffle(ops)
            for op in ops:
                v = op(v)
        if rng.random() < 0.2:
            v = v.convert('L').convert('RGB')
        if rng.random() < 0.5:
            v = v.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
        if rng.random() < 0.5:
            v = v.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(v, dtype=np.float32) / 255
        out.append(torch.from_numpy((arr - data.IMAGENET_MEAN) / data.IMAGENET_STD).permute(2, 0, 1))
    return torch.cat(out)


def pil_hue(img, shift):
    """torchvision's adjust_hue on a PIL image (8-bit HSV, uint8 hue shift)."""
    import numpy as np
    from PIL import Image
    h, s, v = img.convert('HSV').split()
    nh = np.array(h, dtype=np.uint8)
    with np.errstate(over='ignore'):
        nh += np.array(shift * 255).astype(np.uint8)
    return Image.merge('HSV', (Image.fromarray(nh, 'L'), s, v)).convert('RGB')


def bench_data(args):
    torch.set_num_threads(1)
    images = _images(args.images, args.limit)
    rng = random.Random(0)
    rates = _rates({
        'full': lambda raw: moco_pil_views(raw, rng),
        'pil': lambda raw: pil_views(raw, rng),
        'cpu_part': lambda raw: data.train_views(data.open_image(raw, 1 << 30), size=224, rng=rng),
        'decode': lambda raw: data.to_rgb(data.open_image(raw, 1 << 30))}, images, args.seconds)
    batch = torch.randint(0, 256, (2 * args.device_pairs, 3, 224, 224), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    data.device_augment(batch[:4], generator=gen)
    start = time.perf_counter()
    data.device_augment(batch, generator=gen)
    device_s = time.perf_counter() - start
    index = bench_index(args.index_lines)
    full = rates['full']
    rows = [('full MoCo v2 in Pillow (reference-style), 2 views, float', f'{full:.1f} pairs/s/core', '1.00x'),
            ('decode + 2x Pillow crop/resize/flip -> uint8', f'{rates["pil"]:.1f} pairs/s/core',
             f'{rates["pil"] / full:.2f}x'),
            ('CPU part: decode + 2x torch uint8 crop/resize/flip', f'{rates["cpu_part"]:.1f} pairs/s/core',
             f'{rates["cpu_part"] / full:.2f}x'),
            ('JPEG decode only (one image)', f'{rates["decode"]:.1f} img/s/core', ''),
            (f'device ops, {args.device_pairs} pairs, CPU torch 1 thread', f'{device_s * 1000:.0f} ms',
             f'{2 * args.device_pairs / device_s:.0f} img/s'),
            (f'meta index, {args.index_lines:,} lines', f'{index["seconds_per_million"]:.2f} s/M lines',
             f'{index["mb_per_million"]:.1f} MB/M lines')]
    return rows, {'cpu_part_pairs_per_s_core': rates['cpu_part'], 'pil_views_pairs_per_s_core': rates['pil'],
                  'full_pil_pairs_per_s_core': full, 'decode_img_per_s_core': rates['decode'],
                  'device_ops_ms': device_s * 1000, 'device_pairs': args.device_pairs, 'index': index,
                  'images': len(images)}


def bench_index(lines):
    """Time and memory of indexing a YFCC15M-like meta file of `lines` lines."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'meta.jsonl'
        with open(path, 'w') as f:
            for i in range(lines):
                f.write(json.dumps({'filename': f'{i % 1000:03d}/{i:010d}.jpg',
                                    'caption': ['a photo of something rather ordinary number %d' % i],
                                    'tag': ['photo'], 'url': f'http://example.invalid/{i}.jpg'}) + '\n')
        size = path.stat().st_size
        start = time.perf_counter()
        offsets = data.index_lines(path)
        seconds = time.perf_counter() - start
    assert len(offsets) == lines
    return {'lines': lines, 'file_mb': size / 1e6, 'seconds': seconds,
            'seconds_per_million': seconds / lines * 1e6, 'mb_per_million': offsets.nbytes / lines}


def _synthetic_batch(cfg, batch, device, seed=0):
    """uint8 views, captions with eot, EDA captions and MLM positions, as the loader yields them."""
    g = torch.Generator().manual_seed(seed)
    size, length, views = cfg.model.image_size, cfg.model.context_length, cfg.data.views
    text = torch.randint(1, 40_000, (batch, length), generator=g)
    text[:, 0] = data.SOT_ID
    text[:, length // 2] = data.EOT_ID
    text[:, length // 2 + 1:] = 0
    out = {'images': torch.randint(0, 256, (batch, views, 3, size, size), dtype=torch.uint8, generator=g)}
    if cfg.data.mask:
        text, labels = data.mask_tokens(text, generator=g)
        out['mlm_index'], out['mlm_targets'] = data.mlm_positions(labels)
    out['text'] = text
    if cfg.data.eda:
        out['text_eda'] = text.roll(1, dims=0)
    return {k: v.to(device) for k, v in out.items()}


def _sync(device):
    """Wait for the accelerator's queued work (nothing to wait for on CPU)."""
    if device.type != 'cpu':
        torch.accelerator.synchronize()


def matmul_peak_tflops(device, dtype, n):
    """Measured dense matmul throughput (the MFU denominator), TFLOP/s."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps, start = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e12


def _trainer(cfg, precision, device):
    """(model, step): the training step of train.py without DDP or logging, on train.py's model
    and optimiser (cfg.compile decides compilation): device augmentation, forward, declip_loss,
    backward, fused AdamW, logit-scale clamp. step(batch, generator) -> loss."""
    import train
    device_type = device.type
    _, autocast, use_scaler = train.precision(precision, device_type)
    torch.manual_seed(0)
    model = train.build_model(cfg, device)
    opt = train.build_optimizer(model, cfg.optim, device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=use_scaler)
    queue = losses.init_queue(cfg.loss.queue_size, cfg.model.embed_dim, device=device,
                              generator=torch.Generator().manual_seed(0)) if cfg.model.declip else None
    weights = {k: cfg.loss[k] for k in ('clip', 'simsiam', 'mlm', 'nn')}
    state = {'queue': queue, 'ptr': 0}

    def step(batch, gen):
        views = data.device_augment(batch['images'].flatten(0, 1), generator=gen).view(batch['images'].shape)
        with autocast:
            out = model(views, batch['text'], text_eda=batch.get('text_eda'), mlm_index=batch.get('mlm_index'))
        total, _, state['queue'], state['ptr'] = losses.declip_loss(
            out, queue=state['queue'], queue_ptr=state['ptr'], mlm_targets=batch.get('mlm_targets'),
            weights=weights, rank=0, world_size=1)
        scaler.scale(total).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        model.clamp_logit_scale_()
        return total.detach()
    return model, step


def _jpeg_batch(cfg, batch, folder):
    """A device-decode batch (JPEG bytes, boxes, flips) of `batch` files from `folder`, cycled."""
    raws = _images(folder, batch)
    rng = random.Random(0)
    samples = []
    for i in range(batch):
        raw = raws[i % len(raws)]
        img = data.open_image(raw, 1 << 30)
        samples.append(data.jpeg_sample(raw, img.width, img.height, rng, views=cfg.data.views,
                                        scale=tuple(cfg.data.crop_scale)))
    return data.collate_jpeg(samples)


def _host_syncs(step, device_type):
    """Whether one step synchronises with the host (CUDA's sync debug mode raises if it does)."""
    if device_type != 'cuda':
        return None
    torch.cuda.set_sync_debug_mode('error')
    try:
        step()
        return False
    except RuntimeError:
        return True
    finally:
        torch.cuda.set_sync_debug_mode('default')


def bench_step(args):
    """Training-step throughput on synthetic in-memory batches: device augmentation, forward,
    declip_loss, backward, fused AdamW step, logit-scale clamp; FLOPs counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    import train
    cfg = _load_config(args.config, compile=args.compile)
    device, device_type = train.setup_device(0)
    _, step_fn = _trainer(cfg, args.precision, device)
    batch = _synthetic_batch(cfg, args.batch, device)
    gen = torch.Generator().manual_seed(0)
    if args.decode == 'device':  # the step starts from JPEG bytes: nvjpeg decode, crop, resize
        jpegs = _jpeg_batch(cfg, args.batch, args.images)
        decode = data.nvjpeg_decoder(device)

        def step():
            images, _ = data.decode_views(jpegs, size=cfg.model.image_size, device=device, decode=decode)
            return step_fn({**batch, 'images': images}, gen)
    else:
        def step():
            return step_fn(batch, gen)

    if device_type != 'cpu':
        torch.accelerator.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    syncs = _host_syncs(step, device_type)
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        total = step()
    float(total)
    _sync(device)
    step_s = (time.perf_counter() - start) / args.steps
    peak = matmul_peak_tflops(device, torch.bfloat16 if device_type != 'cpu' else torch.float32,
                              args.matmul_n or (8192 if device_type != 'cpu' else 1024))
    mem = train.peak_memory_gib(device_type)
    tflops = flops / step_s / 1e12
    result = {'config': args.config, 'batch': args.batch, 'device': str(device), 'precision': args.precision,
              'compile': args.compile, 'decode': args.decode, 'img_per_s': args.batch / step_s, 'step_ms': step_s * 1000,
              'tflops': tflops, 'matmul_peak_tflops': peak, 'mfu': tflops / peak, 'peak_mem_gib': mem,
              'flops_per_step': flops, 'host_syncs_in_step': syncs}
    label = f'{args.config} batch {args.batch} {args.precision}' + ' compiled' * args.compile
    rows = [(label + ' device JPEG decode' * (args.decode == 'device'),
             f'{result["img_per_s"]:.1f} img/s', f'{result["step_ms"]:.1f} ms/step',
             f'{tflops:.2f} TFLOP/s', f'MFU {result["mfu"]:.1%}', f'{mem:.2f} GiB')]
    return rows, result


def bench_precision(args):
    """Low precision against fp32 from the same initial weights over the same batches: every
    loss finite, and the first --compare losses within --rtol of fp32's."""
    import train
    cfg = _load_config(args.config, compile=args.compile)
    device, device_type = train.setup_device(0)
    names = ('fp32', args.precision if args.precision != 'auto' else 'bf16')
    runs = {}
    for name in names:
        _, step = _trainer(cfg, name, device)
        gen = torch.Generator().manual_seed(0)
        runs[name] = torch.stack([step(_synthetic_batch(cfg, args.batch, device, seed=t), gen)
                                  for t in range(args.steps)]).float().cpu()
    ref, low = runs[names[0]], runs[names[1]]
    k = min(args.compare, args.steps)
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


def _timed_pairs(variants, device, rounds, inner=3):
    """Mean seconds per call of each (before, after) callable, the two alternating each round."""
    spent = {}
    for fn in [f for pair in variants.values() for f in pair]:
        fn()  # warm-up
    for _ in range(rounds):
        for name, pair in variants.items():
            for k, fn in enumerate(pair):
                _sync(device)
                start = time.perf_counter()
                for _ in range(inner):
                    fn()
                _sync(device)
                spent[name, k] = spent.get((name, k), 0.0) + (time.perf_counter() - start) / (rounds * inner)
    return {name: (spent[name, 0], spent[name, 1]) for name in variants}


def _math_attention(q, k, v, is_causal=False):
    """Attention as plain matmul + softmax (the implementation SDPA replaces)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if is_causal:
        n = q.shape[-2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float('-inf'))
    return scores.softmax(-1) @ v


def _pairwise_clip_loss(*, images, texts, all_images, all_texts, logit_scale, labels):
    """multiview_clip_loss with two matmuls per (image view, text view) pair."""
    total = 0.0
    for image, all_image in zip(images, all_images):
        for text, all_text in zip(texts, all_texts):
            total = total + losses.pair_loss(logit_scale * image @ all_text.T, logit_scale * text @ all_image.T, labels)
    return total / (len(images) * len(texts))


def _whole_batch_plan(plan, device):
    """device_augment's former form: every op on the whole batch, kept by torch.where where the
    sample's flag is set (what a device-side mask does without host-known subsets)."""
    n = len(plan[0][1])
    index = torch.arange(n, device=device)

    def masked(op, mask):
        return lambda y, f: torch.where(mask.view(-1, 1, 1, 1), op(y, f), y)
    return [(masked(op, mask.to(device)), n, index, param.float().to(device)) for op, mask, param in plan]


def bench_parts(args):
    """Each speed choice of the step against the form it replaced, forward + backward (or the
    optimiser step) of that part alone, in one run: ms before, ms after, ratio."""
    from unittest import mock

    import declip
    import train
    cfg = _load_config(args.config)
    device, device_type = train.setup_device(0)
    _, autocast, _ = train.precision(args.precision, device_type)
    torch.manual_seed(0)
    model = declip.build_model(cfg.model).to(device)
    m, b = cfg.model, args.batch
    g = torch.Generator().manual_seed(0)
    images = torch.randn(b, cfg.data.views, 3, m.image_size, m.image_size, generator=g).to(device)
    text = _synthetic_batch(cfg, b, device)['text']

    def fwd_bwd(fn, module=model):
        def run():
            with autocast:
                out = fn()
            out.float().sum().backward()
            module.zero_grad(set_to_none=True)
        return run

    variants = {}
    if m.vision == 'vit' and cfg.data.views > 1:
        variants['image views: one forward per view -> one forward of all views'] = (
            fwd_bwd(lambda: torch.stack([model.visual(images[:, v]) for v in range(images.shape[1])])),
            fwd_bwd(lambda: model.encode_views(images)))
    if m.vision == 'resnet' and device_type != 'cpu':
        visual_cl = copy.deepcopy(model.visual).to(memory_format=torch.channels_last)
        first_cl = images[:, 0].contiguous(memory_format=torch.channels_last)
        variants['ResNet: NCHW -> channels_last'] = (
            fwd_bwd(lambda: model.visual(images[:, 0])), fwd_bwd(lambda: visual_cl(first_cl), visual_cl))

    def text_tower():
        return model.encode_text(text)

    def math_text_tower():
        with mock.patch.object(torch.nn.functional, 'scaled_dot_product_attention', _math_attention):
            return model.encode_text(text)
    variants['text tower attention: matmul + softmax -> SDPA'] = (fwd_bwd(math_text_tower), fwd_bwd(text_tower))

    if m.declip:
        words = torch.randn(b, m.context_length, m.text_width, generator=g).to(device).requires_grad_()
        index = _synthetic_batch(cfg, b, device)['mlm_index']
        targets = torch.randint(0, m.vocab_size, (index.numel(),), generator=g).to(device)
        head = model.text_label_predictor
        variants['MLM head: all positions -> masked positions only'] = (
            fwd_bwd(lambda: losses.mlm_loss(logits=head(words).flatten(0, 1)[index], targets=targets)),
            fwd_bwd(lambda: losses.mlm_loss(logits=head(words.flatten(0, 1)[index]), targets=targets)))

    feats = [losses.normalize_image(torch.randn(b, m.embed_dim, generator=g).to(device)).requires_grad_()
             for _ in range(cfg.data.views + int(cfg.data.eda))]
    views, texts = feats[:cfg.data.views], feats[cfg.data.views:] or feats[:1]
    clip_args = dict(images=views, texts=texts, all_images=views, all_texts=texts,
                     logit_scale=torch.tensor(14.3, device=device), labels=torch.arange(b, device=device))
    variants['CLIP logits: 2 matmuls per pair -> 1 per image view + 1 per pair'] = (
        fwd_bwd(lambda: _pairwise_clip_loss(**clip_args)), fwd_bwd(lambda: losses.multiview_clip_loss(**clip_args)))

    uint8_views = torch.randint(0, 256, (b * cfg.data.views, 3, m.image_size, m.image_size), generator=g).to(
        device, torch.uint8)

    def augment():
        return data.device_augment(uint8_views, generator=torch.Generator().manual_seed(0))

    def augment_whole_batch():
        with mock.patch.object(data, '_plan_on_device', _whole_batch_plan):
            return augment()
    variants['colour ops: every op on the whole batch (torch.where) -> each op on its samples'] = (
        augment_whole_batch, augment)

    params = [p.detach().clone().requires_grad_() for p in model.parameters() if p.requires_grad]
    for p in params:  # copies: the forward/backward parts above reset the model's gradients
        p.grad = torch.randn_like(p) * 1e-3
    opts = [torch.optim.AdamW(params, lr=1e-6, foreach=False), torch.optim.AdamW(params, lr=1e-6, fused=True)]
    variants['AdamW: per-tensor loop -> fused'] = (opts[0].step, opts[1].step)
    times = _timed_pairs(variants, device, args.rounds)
    result = {'config': args.config, 'batch': b, 'device': str(device), 'precision': args.precision,
              'parts': {name: {'before_ms': t0 * 1000, 'after_ms': t1 * 1000, 'speedup': t0 / t1}
                        for name, (t0, t1) in times.items()}}
    rows = [(name, f'{t0 * 1000:.2f} ms', f'{t1 * 1000:.2f} ms', f'{t0 / t1:.2f}x') for name, (t0, t1) in times.items()]
    return rows, result


def _load_config(spec, compile=False):
    """A config file path with an optional `:arg`, as train.py takes it; the towers are compiled
    only when asked (--compile), whatever the file says."""
    import importlib.util
    path, _, arg = spec.partition(':')
    module_spec = importlib.util.spec_from_file_location('bench_config', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(arg or None)
    cfg.compile = str(compile).lower()
    return cfg


def _e2e_once(args, root):
    """Pairs/s and data-wait fraction of one loader run."""
    cfg = _load_config(args.config)
    cfg.data.update(dict(train_root=str(root), train_meta=str(root / 'meta.jsonl'), workers=args.workers,
                         batch_size=args.batch, prefetch=args.prefetch, image_size=args.size, decode=args.decode,
                         eda_synonyms=Path(cfg.data.synonyms_path).is_file()))
    loader = data.build_train_loader(cfg.data, rank=0, world=1, start_step=0,
                                     max_iter=args.warmup + args.steps, pin_memory=False)
    it = iter(loader)
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
    """The real loader over JPEG files with N workers feeding a consumer that takes --step-ms per
    batch: achieved pairs/s and the fraction of time the consumer waited for data (the median of
    --repeats runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        lines = []
        for i, src in enumerate(_image_files(args.images, args.limit)):
            (root / src.name).symlink_to(src.resolve())
            lines.append(json.dumps({'filename': src.name, 'caption': f'a natural photo number {i} of something'}))
        (root / 'meta.jsonl').write_text('\n'.join(lines) + '\n')
        runs = sorted(_e2e_once(args, root) for _ in range(args.repeats))
    pairs, wait = runs[len(runs) // 2]
    result = {'workers': args.workers, 'batch': args.batch, 'decode': args.decode, 'pairs_per_s': pairs,
              'pairs_per_s_per_worker': pairs / max(args.workers, 1), 'data_wait_frac': wait,
              'step_ms': args.step_ms, 'size': args.size, 'runs': runs}
    rows = [(f'loader ({args.decode} decode), {args.workers} workers, batch {args.batch}, '
             f'consumer {args.step_ms:.0f} ms/step',
             f'{pairs:.1f} pairs/s', f'{result["pairs_per_s_per_worker"]:.1f} /worker', f'wait {wait:.1%}')]
    return rows, result


def print_table(title, rows):
    width = max(len(r[0]) for r in rows)
    print(f'\n{title}')
    for row in rows:
        print(f'  {row[0]:<{width}}  ' + '  '.join(f'{c:>18}' for c in row[1:]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='mode', required=True)

    def model_parser(mode, help, *, batch, precision):
        p = sub.add_parser(mode, help=help)
        p.add_argument('--config', default='configs/vitb32.py')
        p.add_argument('--batch', type=int, default=batch)
        p.add_argument('--precision', default=precision)
        return p

    p = sub.add_parser('data', help='host pipeline per core, device ops on CPU, meta index')
    p.add_argument('--images', default=str(BENCH_IMAGES))
    p.add_argument('--limit', type=int, default=240)
    p.add_argument('--seconds', type=float, default=10.0)
    p.add_argument('--device-pairs', type=int, default=256)
    p.add_argument('--index-lines', type=int, default=1_000_000)
    p = model_parser('step', 'training-step throughput on synthetic batches', batch=256, precision='auto')
    p.add_argument('--compile', action='store_true')
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--matmul-n', type=int, default=0)
    p.add_argument('--decode', default='host', choices=('host', 'device'),
                   help="'device': each step decodes --images JPEGs with nvjpeg first (torchvision)")
    p.add_argument('--images', default=str(BENCH_IMAGES))
    p = model_parser('precision', 'bf16 (or fp16) losses against fp32 over the same batches', batch=128,
                     precision='bf16')
    p.add_argument('--compile', action='store_true')
    p.add_argument('--steps', type=int, default=200)
    p.add_argument('--compare', type=int, default=20)
    p.add_argument('--rtol', type=float, default=0.02)
    p = model_parser('parts', 'each speed choice of the step against the form it replaced', batch=256,
                     precision='auto')
    p.add_argument('--rounds', type=int, default=5)
    p = sub.add_parser('e2e', help='the real loader over JPEG files')
    p.add_argument('--config', default='configs/vitb32.py')
    p.add_argument('--images', default=str(BENCH_IMAGES))
    p.add_argument('--limit', type=int, default=240)
    p.add_argument('--workers', type=int, default=os.cpu_count())
    p.add_argument('--batch', type=int, default=256)
    p.add_argument('--prefetch', type=int, default=4)
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--steps', type=int, default=10)
    p.add_argument('--step-ms', type=float, default=0.0)
    p.add_argument('--repeats', type=int, default=1)
    p.add_argument('--decode', default='host', choices=('host', 'device'),
                   help="'device': workers send JPEG bytes and crop boxes (nothing is decoded here)")
    for p in sub.choices.values():
        p.add_argument('--out', default='bench_out/bench.json')
    args = parser.parse_args(argv)
    rows, result = {'data': bench_data, 'step': bench_step, 'precision': bench_precision, 'parts': bench_parts,
                          'e2e': bench_e2e}[args.mode](args)
    print_table(f'bench.py {args.mode}', rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({'mode': args.mode, 'argv': sys.argv[1:], **_machine(), **result}, indent=2))
    return result


if __name__ == '__main__':
    sys.exit(0 if main().get('ok', True) else 1)  # `precision` fails when low precision drifts
