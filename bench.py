"""Speed and memory benchmarks; a table on stdout and JSON in --out.

    python bench.py data                       # host pipeline per core, device ops on CPU, meta index
    python bench.py step --config configs/vitb32.py --batch 256
    python bench.py e2e --workers 16           # real loader over JPEG files

Every mode also runs on CPU with tiny settings so that tests can smoke it (not time it).
"""
import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import data

ROOT = Path(__file__).resolve().parent
BENCH_IMAGES = ROOT.parent / 'shared' / 'bench_images'


def _machine():
    return {'machine': platform.machine(), 'cpu_count': os.cpu_count(), 'torch': torch.__version__,
            'python': platform.python_version(), 'date': time.strftime('%Y-%m-%d')}


def _images(folder, limit):
    files = sorted(Path(folder).glob('*.jpg'))[:limit]
    if not files:
        raise FileNotFoundError(f'no .jpg files in {folder} (--images)')
    return [f.read_bytes() for f in files]


def _rate(fn, items, min_seconds):
    """Items per second of fn over `items`, repeated until min_seconds have passed."""
    done, start = 0, time.perf_counter()
    while True:
        for item in items:
            fn(item)
        done += len(items)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed


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
                   lambda x: _pil_hue(x, rng.uniform(-0.1, 0.1))]
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


def _pil_hue(img, shift):
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
    cpu_part = _rate(lambda raw: data.train_views(data.open_image(raw, 1 << 30), size=224, rng=rng),
                     images, args.seconds)
    full_pil = _rate(lambda raw: moco_pil_views(raw, rng), images, args.seconds)
    decode = _rate(lambda raw: data.to_rgb(data.open_image(raw, 1 << 30)), images, args.seconds)
    batch = torch.randint(0, 256, (2 * args.device_pairs, 3, 224, 224), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    data.device_augment(batch[:4], generator=gen)
    start = time.perf_counter()
    data.device_augment(batch, generator=gen)
    device_s = time.perf_counter() - start
    index = bench_index(args.index_lines)
    rows = [('CPU part: decode + 2x (crop, resize, flip) -> uint8', f'{cpu_part:.1f} pairs/s/core',
             f'{cpu_part / full_pil:.2f}x'),
            ('full MoCo v2 in Pillow (reference-style), 2 views', f'{full_pil:.1f} pairs/s/core', '1.00x'),
            ('JPEG decode only (one image)', f'{decode:.1f} img/s/core', ''),
            (f'device ops, {args.device_pairs} pairs, CPU torch 1 thread', f'{device_s * 1000:.0f} ms',
             f'{2 * args.device_pairs / device_s:.0f} img/s'),
            (f'meta index, {args.index_lines:,} lines', f'{index["seconds_per_million"]:.2f} s/M lines',
             f'{index["mb_per_million"]:.1f} MB/M lines')]
    return rows, {'cpu_part_pairs_per_s_core': cpu_part, 'full_pil_pairs_per_s_core': full_pil,
                  'decode_img_per_s_core': decode, 'device_ops_ms': device_s * 1000,
                  'device_pairs': args.device_pairs, 'index': index, 'images': len(images)}


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


def print_table(title, rows):
    width = max(len(r[0]) for r in rows)
    print(f'\n{title}')
    for row in rows:
        print(f'  {row[0]:<{width}}  ' + '  '.join(f'{c:>18}' for c in row[1:]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='mode', required=True)
    p = sub.add_parser('data', help='host pipeline per core, device ops on CPU, meta index')
    p.add_argument('--images', default=str(BENCH_IMAGES))
    p.add_argument('--limit', type=int, default=240)
    p.add_argument('--seconds', type=float, default=10.0)
    p.add_argument('--device-pairs', type=int, default=256)
    p.add_argument('--index-lines', type=int, default=1_000_000)
    for p in sub.choices.values():
        p.add_argument('--out', default='bench_out/bench.json')
    args = parser.parse_args(argv)
    rows, result = {'data': bench_data}[args.mode](args)
    print_table(f'bench.py {args.mode}', rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({'mode': args.mode, 'argv': sys.argv[1:], **_machine(), **result}, indent=2))
    return result


if __name__ == '__main__':
    main()
