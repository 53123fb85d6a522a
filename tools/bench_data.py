"""`bench.py data`: the host pipeline's variants per core (one thread), the device colour ops on the
CPU and the meta index; and the Pillow forms of the crops and colour ops it measures against (the
tests use them as references too)."""
import json
import random
import tempfile
import time
from pathlib import Path

import torch

import data
import images


def image_files(folder, limit):
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
    raws = [f.read_bytes() for f in image_files(args.images, args.limit)]
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
