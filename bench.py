"""Speed and memory benchmarks; a table on stdout and JSON in --out.

    python bench.py data                                       # host pipeline per core, device ops on CPU, meta index
    python bench.py step --config=configs/vitb32.py --batch=256  # add --compile on CUDA, --decode=device
    python bench.py parts --config=configs/r50.py --batch=256    # each speed choice vs its former form
    python bench.py precision --config=configs/vitb32.py --batch=128  # bf16 losses against fp32
    python bench.py e2e --workers=16 --step_ms=71                # real loader over JPEG files

The mode comes first; flags a mode does not use are ignored. `step` and `precision` time the
loop's own step (accum.train_step with accum_steps > 1). Every mode runs on CPU in tiny settings (tests do).
"""
import ast
import copy
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from unittest import mock

import torch
from absl import app, flags

import accum
import data
import declip
import images
import losses
import runtime
import text
import trainstep

FLAGS = flags.FLAGS
ROOT = Path(__file__).resolve().parent
BENCH_IMAGES = ROOT.parent / 'shared' / 'bench_images'


def _image_files(folder, limit):
    files = sorted(Path(folder).glob('*.jpg'))[:limit]
    if not files:
        raise FileNotFoundError(f'no .jpg files in {folder} (--images)')
    return files


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


def _pil_crop(img, rng, size):
    from PIL import Image
    left, top, w, h = images.rrc_params(img.width, img.height, rng)
    return img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)


def pil_views(raw, rng, size=224):
    """The previous CPU part, for comparison: like images.train_views, but Pillow's crop + BILINEAR
    resize + flip (torchvision's RandomResizedCrop on PIL images, exactly)."""
    img = images.to_rgb(images.open_image(raw, 1 << 30))
    views = [_pil_crop(img, rng, size) for _ in range(2)]
    flip = 0  # PIL.Image.Transpose.FLIP_LEFT_RIGHT
    return torch.stack([images._to_chw(v.transpose(flip) if rng.random() < 0.5 else v) for v in views])


def moco_pil_views(raw, rng, size=224):
    """The reference's host pipeline, for comparison only: MoCo v2 entirely in Pillow/numpy,
    two views, float normalised output (what torchvision's transforms do on PIL images)."""
    import io

    import numpy as np
    from PIL import Image, ImageEnhance, ImageFilter
    img = Image.open(io.BytesIO(raw)).convert('RGB')
    out = []
    for _ in range(2):
        v = _pil_crop(img, rng, size)
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
        out.append(torch.from_numpy((arr - images.IMAGENET_MEAN) / images.IMAGENET_STD).permute(2, 0, 1))
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
    """Host pipeline variants per core (one thread), the device colour ops on CPU, the meta index."""
    torch.set_num_threads(1)
    raws = [f.read_bytes() for f in _image_files(args.images, args.limit)]
    rng = random.Random(0)
    rates = _rates({
        'full': lambda raw: moco_pil_views(raw, rng),
        'pil': lambda raw: pil_views(raw, rng),
        'cpu_part': lambda raw: images.train_views(images.open_image(raw, 1 << 30), size=224, rng=rng),
        'decode': lambda raw: images.to_rgb(images.open_image(raw, 1 << 30))}, raws, args.seconds)
    batch = torch.randint(0, 256, (2 * args.device_pairs, 3, 224, 224), dtype=torch.uint8)
    for views in (batch[:4], batch):  # warm-up, then timed
        start = time.perf_counter()
        images.device_augment(views, generator=torch.Generator().manual_seed(0))
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
                  'images': len(raws)}


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
    step = accum.train_step if cfg.accum_steps > 1 else trainstep.train_step
    return lambda batch: step(state, batch, cfg)['loss']['total']


def _jpeg_batch(cfg, batch, folder):
    """A device-decode batch (JPEG bytes, boxes, flips) of `batch` files from `folder`, cycled."""
    raws = [f.read_bytes() for f in _image_files(folder, batch)]
    raws = [(raw, *images.open_image(raw, 1 << 30).size) for raw in raws]
    crops = dict(views=cfg.data.views, scale=tuple(cfg.data.crop_scale), flip=images.moco_views(cfg.data.augmentation))
    return images.collate_jpeg([images.jpeg_sample(*raws[i % len(raws)], random.Random(i), **crops)
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
    """(seconds per step, FLOPs of one step, whether a step synchronises with the host)."""
    runtime.reset_peak_memory(device.type)
    for _ in range(warmup):
        step()
    with runtime.flop_counter() as counter:
        step()
    syncs = _host_syncs(step, device.type)
    runtime.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        total = step()
    float(total)
    runtime.synchronize(device)
    return (time.perf_counter() - start) / steps, counter.get_total_flops(), syncs


def bench_step(args):
    """Throughput of the loop's step on one synthetic in-memory batch (with --decode=device its
    JPEG bytes: decode, crop and resize happen in the step); FLOPs counted by torch."""
    cfg = _load_config(args.config, compile=args.compile, precision=args.precision, overrides=args.set)
    cfg.data.batch_size = args.batch // cfg.accum_steps
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
              'compile': trainstep.compile_scope(cfg.compile, device_type), 'decode': args.decode, 'img_per_s': args.batch / step_s,
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


def _timed_pairs(variants, device, rounds, inner=3):
    """Mean seconds per call of each (before, after) callable, the two alternating each round."""
    spent = {}
    for fn in [f for pair in variants.values() for f in pair]:
        fn()  # warm-up
    for _ in range(rounds):
        for name, pair in variants.items():
            for k, fn in enumerate(pair):
                runtime.synchronize(device)
                start = time.perf_counter()
                for _ in range(inner):
                    fn()
                runtime.synchronize(device)
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
        for txt, all_text in zip(texts, all_texts):
            total = total + losses.pair_loss(logit_scale * image @ all_text.T, logit_scale * txt @ all_image.T, labels)
    return total / (len(images) * len(texts))


def _view_variants(p):
    """Image tower: both views in one forward and the patch embedding (ViT); channels-last ResNet (CUDA only)."""
    m, model = p.cfg.model, p.model
    views = torch.randn(p.batch, p.cfg.data.views, 3, m.image_size, m.image_size, generator=p.g).to(p.device)
    out = {}
    if m.vision == 'vit' and p.cfg.data.views > 1:
        out['image views: one forward per view -> one forward of all views'] = (
            p.fwd_bwd(lambda: torch.stack([model.visual(views[:, v]) for v in range(views.shape[1])])),
            p.fwd_bwd(lambda: model.encode_views(views)))
    if m.vision == 'vit':
        conv, first = copy.deepcopy(model.visual.conv1).requires_grad_(), views[:, 0]
        out['patch embedding: strided convolution -> patch matmul'] = (
            p.fwd_bwd(lambda: conv(first), conv), p.fwd_bwd(lambda: declip.patch_embed(first, conv.weight), conv))
    if m.vision == 'resnet' and p.device.type == 'cuda':  # channels-last is used on CUDA only
        visual_cl = copy.deepcopy(model.visual).to(memory_format=torch.channels_last)
        first_cl = views[:, 0].contiguous(memory_format=torch.channels_last)
        out['ResNet: NCHW -> channels_last'] = (
            p.fwd_bwd(lambda: model.visual(views[:, 0])), p.fwd_bwd(lambda: visual_cl(first_cl), visual_cl))
    return out


def _text_variants(p):
    """Text tower attention: SDPA against matmul + softmax."""
    def math_text_tower():
        with mock.patch.object(torch.nn.functional, 'scaled_dot_product_attention', _math_attention):
            return p.model.encode_text(p.inputs['text'])
    return {'text tower attention: matmul + softmax -> SDPA': (
        p.fwd_bwd(math_text_tower), p.fwd_bwd(lambda: p.model.encode_text(p.inputs['text'])))}


def _mlm_variants(p):
    """MLM head on the masked positions only, against all positions (DeCLIP only)."""
    m = p.cfg.model
    if not m.declip:
        return {}
    words = torch.randn(p.batch, m.context_length, m.text_width, generator=p.g).to(p.device).requires_grad_()
    index = p.inputs['mlm_index']
    targets = torch.randint(0, m.vocab_size, (index.numel(),), generator=p.g).to(p.device)
    head = p.model.text_label_predictor
    return {'MLM head: all positions -> masked positions only': (
        p.fwd_bwd(lambda: losses.mlm_loss(logits=head(words).flatten(0, 1)[index], targets=targets)),
        p.fwd_bwd(lambda: losses.mlm_loss(logits=head(words.flatten(0, 1)[index]), targets=targets)))}


def _clip_variants(p):
    """CLIP logits: one matmul per image view against all captions, against two per pair."""
    views, eda = p.cfg.data.views, int(p.cfg.data.eda)
    feats = [losses.normalize_image(torch.randn(p.batch, p.cfg.model.embed_dim, generator=p.g).to(p.device))
             .requires_grad_() for _ in range(views + eda)]
    image, caption = feats[:views], feats[views:] or feats[:1]
    args = dict(images=image, texts=caption, all_images=image, all_texts=caption,
                logit_scale=torch.tensor(14.3, device=p.device), labels=torch.arange(p.batch, device=p.device))
    return {'CLIP logits: 2 matmuls per pair -> 1 per image view + 1 per pair': (
        p.fwd_bwd(lambda: _pairwise_clip_loss(**args)), p.fwd_bwd(lambda: losses.multiview_clip_loss(**args)))}


def _colour_variants(p):
    """Colour ops on each op's samples only, against every op on the whole batch."""
    size = p.cfg.model.image_size
    uint8_views = torch.randint(0, 256, (p.batch * p.cfg.data.views, 3, size, size), generator=p.g).to(
        p.device, torch.uint8)

    def augment(static):
        return lambda: images.device_augment(uint8_views, generator=torch.Generator().manual_seed(0), static=static)
    return {'colour ops: every op on the whole batch (torch.where) -> each op on its samples': (
        augment(True), augment(False))}


def _adamw_variants(p):
    """AdamW fused against its per-tensor loop, on copies of the parameters with fixed gradients."""
    params = [q.detach().clone().requires_grad_() for q in p.model.parameters() if q.requires_grad]
    for q in params:  # copies: the forward/backward parts reset the model's gradients
        q.grad = torch.randn_like(q) * 1e-3
    opts = [torch.optim.AdamW(params, lr=1e-6, foreach=False), torch.optim.AdamW(params, lr=1e-6, fused=True)]
    return {'AdamW: per-tensor loop -> fused': (opts[0].step, opts[1].step)}


def _fwd_bwd(fn, module, autocast):
    """A callable running forward (under autocast) + backward of fn, then clearing the gradients."""
    def run():
        with autocast:
            out = fn()
        out.float().sum().backward()
        module.zero_grad(set_to_none=True)
    return run


def bench_parts(args):
    """Each speed choice of the step against the form it replaced, forward + backward (or the
    optimiser step) of that part alone, in one run: ms before, ms after, ratio."""
    cfg = _load_config(args.config)
    device, device_type = runtime.setup_device(0)
    _, autocast, _ = runtime.precision(args.precision, device_type)
    torch.manual_seed(0)
    model = declip.build_model(cfg.model).to(device)
    p = types.SimpleNamespace(cfg=cfg, model=model, device=device, batch=args.batch,
                              g=torch.Generator().manual_seed(0), inputs=_synthetic_batch(cfg, args.batch, device),
                              fwd_bwd=lambda fn, module=model: _fwd_bwd(fn, module, autocast))
    families = (_view_variants, _text_variants, _mlm_variants, _clip_variants, _colour_variants, _adamw_variants)
    variants = {name: pair for family in families for name, pair in family(p).items()}
    times = _timed_pairs(variants, device, args.rounds)
    result = {'config': args.config, 'batch': args.batch, 'device': str(device), 'precision': args.precision,
              'parts': {name: {'before_ms': t0 * 1000, 'after_ms': t1 * 1000, 'speedup': t0 / t1}
                        for name, (t0, t1) in times.items()}}
    rows = [(name, f'{t0 * 1000:.2f} ms', f'{t1 * 1000:.2f} ms', f'{t0 / t1:.2f}x') for name, (t0, t1) in times.items()]
    return rows, result


def _load_config(spec, compile=False, precision=None, overrides=()):
    """A config file[:arg] as train.py takes it, compiled only with --compile, `precision` and
    `overrides` ('key.path=value', a Python literal) replacing the file's."""
    import importlib.util
    path, _, arg = spec.partition(':')
    module_spec = importlib.util.spec_from_file_location('bench_config', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(arg or None)
    cfg.compile = str(compile).lower()
    if precision:
        cfg.precision = precision
    for key, _, value in (item.partition('=') for item in overrides):
        parent, _, leaf = key.rpartition('.')
        (cfg[parent] if parent else cfg)[leaf] = ast.literal_eval(value)
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
    """The real loader over JPEG files, N workers, a consumer taking --step_ms per batch: pairs/s
    and the fraction of time it waited for data (median of --repeats runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        root, files = Path(tmp), _image_files(args.images, args.limit)
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


def bench_memory(args):
    """`step`'s peak memory and time per sample, plain / --accum micro-batches / gradient
    checkpointing, each in its own process (peak RSS is per process), as ratios to plain."""
    variants = {'plain': 'accum_steps=1', f'accum_steps {args.accum}': f'accum_steps={args.accum}',
                'grad checkpointing': 'model.grad_checkpointing=True'}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, override in variants.items():
            cmd = [sys.executable, str(ROOT / 'bench.py'), 'step', f'--config={args.config}', f'--set={override}',
                   f'--batch={args.batch}', f'--warmup={args.warmup}', f'--steps={args.steps}', f'--out={tmp}/s.json']
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            results[name] = json.loads((Path(tmp) / 's.json').read_text())
    mem, speed = results['plain']['peak_mem_gib'], results['plain']['img_per_s']
    rows = [(name, f'{r["peak_mem_gib"]:.3f} GiB', f'x{r["peak_mem_gib"] / mem:.2f} memory',
             f'{1000 / r["img_per_s"]:.2f} ms/sample', f'x{speed / r["img_per_s"]:.2f} time')
            for name, r in results.items()]
    return rows, {'config': args.config, 'batch': args.batch, 'variants': results}


def print_table(title, rows):
    width = max(len(r[0]) for r in rows)
    print(f'\n{title}', *(f'  {row[0]:<{width}}  ' + '  '.join(f'{c:>18}' for c in row[1:]) for row in rows), sep='\n')


MODES = {'data': bench_data, 'step': bench_step, 'precision': bench_precision, 'parts': bench_parts, 'e2e': bench_e2e,
         'memory': bench_memory}
# The defaults that differ between modes: flags left unset (None or '') take their mode's value.
MODE_DEFAULTS = {'step': dict(batch=256, precision='auto', warmup=5, steps=20),
                 'memory': dict(batch=64, warmup=2, steps=5), 'precision': dict(batch=128, precision='bf16', steps=50),
                 'parts': dict(batch=256, precision='auto'), 'e2e': dict(batch=256, warmup=2, steps=10)}


def define_flags():
    """bench.py's flags, defined once per process (main defines them when a test calls it)."""
    if 'matmul_n' in FLAGS:
        return
    flags.DEFINE_string('config', 'configs/vitb32.py', 'step, precision, parts, e2e: config file[:arg]')
    flags.DEFINE_integer('batch', None, 'pairs per step (default 256; precision: 128)')
    flags.DEFINE_string('precision', '', 'auto, bf16, fp16 or fp32 (default auto; precision: bf16, against fp32)')
    flags.DEFINE_boolean('compile', False, "step, precision: torch.compile (config.compile 'true'; "
                         "--set=compile=\"'model'\" picks a scope)")
    flags.DEFINE_integer('warmup', None, 'step, e2e: untimed steps first (default 5; e2e: 2)')
    flags.DEFINE_integer('steps', None, 'step, precision, e2e: timed steps (default 20; precision 50; e2e 10)')
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
    flags.DEFINE_multi_string('set', [], 'step: config override key=value (e.g. accum_steps=4)')
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
