"""The generated demo corpus: large coloured shapes on textured backgrounds, captions naming colour
and shape (zero-shot classes need both). `python tools/prepare.py make-demo` writes it."""
import json
import math
import os
from pathlib import Path

import data

# class word -> (RGB, other words a caption may use for it: one caption in four does)
DEMO_COLORS = {'red': ((215, 35, 35), ('crimson', 'scarlet')),
               'yellow': ((240, 205, 25), ('golden', 'lemon')),
               'green': ((35, 165, 55), ('emerald', 'grass green')),
               'blue': ((40, 75, 225), ('cobalt', 'deep blue'))}
DEMO_SHAPES = {'circle': ('disc', 'round dot'), 'square': ('box', 'block'), 'triangle': ('wedge', 'pyramid'),
               'cross': ('plus sign', 'plus'), 'ring': ('hoop', 'donut')}
# diameter as a fraction of the image side: even a 0.2-area crop (0.45 of the side) holds part of the object
DEMO_SIZES = {'small': 0.5, 'medium': 0.62, 'large': 0.75}
DEMO_BACKGROUNDS = {'grey': ((128, 128, 128), 'plain'), 'sandy': ((180, 165, 125), 'noisy'),
                    'striped': ((115, 125, 135), 'stripes'), 'checked': ((140, 135, 125), 'checks'),
                    'dark': ((60, 60, 66), 'noisy')}
DEMO_TEMPLATES = (
    'a {size} {color} {shape} on a {bg} background',
    'there is a {color} {shape} {where}',
    'photo of a {shape} painted {color}',
    'the {shape} here is {color} and {size}',
    'my drawing: one {size} {shape}, coloured {color}',
    '{color} paint in the shape of a {shape}, {where}',
    'look at this {color} {shape}!',
    'a {shape} in {color} on {bg} paper',
    'clip art: {color} {shape}, {size}',
    'i made a {shape} and painted it {color}',
    'a {bg} backdrop with a {size} {color} {shape} {where}',
    '{size} {shape}, {color}, {where}',
)
# unit outlines (radius 1, y down) of the polygon shapes; circle and ring are drawn as ellipses
_ARM = 0.34
DEMO_OUTLINES = {
    'square': ((-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)),
    'triangle': ((0.0, -1.1), (0.95, 0.65), (-0.95, 0.65)),
    'cross': ((-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM), (_ARM, 1),
              (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM))}


def demo_class_names():
    """Zero-shot classes, label order: every colour with every shape ('red circle', ...)."""
    return [f'{c} {s}' for c in DEMO_COLORS for s in DEMO_SHAPES]


def demo_spec(seed, split, i):
    """What sample i of a split shows and says, deterministic from (seed, split, i). Classes take
    turns (i modulo the class count), so colours, shapes and classes are balanced."""
    rng = data.seeded_rng(seed, split, i)
    label = i % (len(DEMO_COLORS) * len(DEMO_SHAPES))
    color, shape = list(DEMO_COLORS)[label // len(DEMO_SHAPES)], list(DEMO_SHAPES)[label % len(DEMO_SHAPES)]
    size, bg = rng.choice(list(DEMO_SIZES)), rng.choice(list(DEMO_BACKGROUNDS))
    room = max(0.0, 0.46 - DEMO_SIZES[size] * 1.08 / 2)      # the object stays inside the image
    dx, dy = rng.uniform(-room, room), rng.uniform(-room, room)
    where = ('in the middle' if max(abs(dx), abs(dy)) < 0.03 else
             ('on the left' if dx < 0 else 'on the right') if abs(dx) >= abs(dy) else
             ('near the top' if dy < 0 else 'near the bottom'))

    def word(name, others):
        return name if rng.random() < 0.75 else rng.choice(others)
    caption = rng.choice(DEMO_TEMPLATES).format(color=word(color, DEMO_COLORS[color][1]), size=size, bg=bg,
                                                shape=word(shape, DEMO_SHAPES[shape]), where=where)
    return dict(label=label, color=color, shape=shape, size=size, bg=bg, dx=dx, dy=dy, caption=caption,
                scale=rng.uniform(0.92, 1.08), angle=rng.uniform(-20, 20), noise=rng.randrange(1 << 32))


def demo_image(spec, side):
    """The picture of a demo_spec: a textured background and one object, side x side RGB."""
    import numpy as np
    from PIL import Image, ImageDraw
    base, pattern = DEMO_BACKGROUNDS[spec['bg']]
    nrng = np.random.default_rng(spec['noise'])
    pixels = np.asarray(base, np.float32) + nrng.normal(0, 16 if pattern == 'noisy' else 6, (side, side, 3))
    rows, cols = np.indices((side, side)) * 8 // side       # 8 stripes / an 8 x 8 board at any side
    if pattern == 'stripes':
        pixels[rows % 2 == 0] += 30
    elif pattern == 'checks':
        pixels[(rows + cols) % 2 == 0] += 30
    fill = np.asarray(DEMO_COLORS[spec['color']][0]) + nrng.integers(-15, 16, 3)     # a shade of the colour
    fill = tuple(int(c) for c in fill.clip(0, 255))
    img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    r = DEMO_SIZES[spec['size']] * spec['scale'] * side / 2
    cx, cy = side * (0.5 + spec['dx']), side * (0.5 + spec['dy'])
    if spec['shape'] in ('circle', 'ring'):
        width = max(2, round(r * 0.42)) if spec['shape'] == 'ring' else 0
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=None if width else fill, outline=fill, width=width)
    else:
        cos, sin = math.cos(math.radians(spec['angle'])), math.sin(math.radians(spec['angle']))
        draw.polygon([(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos))
                      for x, y in DEMO_OUTLINES[spec['shape']]], fill=fill)
    return img


def _demo_pair(args):
    """One (jpeg bytes, caption, label) of the demo set."""
    import io
    seed, split, i, side = args
    spec = demo_spec(seed, split, i)
    buf = io.BytesIO()
    demo_image(spec, side).save(buf, format='JPEG', quality=90)
    return buf.getvalue(), spec['caption'], spec['label']


def make_demo(out, *, train=10_000, val=2_000, seed=0, side=80, shard_size=1_000, workers=None):
    """Write the demo corpus: train/ JPEGs + train.jsonl (YFCC15M layout), shards/*.tar
    (webdataset), val/ JPEGs + val.jsonl (ImageNet-val layout) + classnames.txt. The validation
    images come from the same generator under another seed stream ('val' instead of 'train')."""
    import io
    import multiprocessing
    import tarfile
    out = Path(out)
    for sub in ('train', 'val', 'shards'):
        (out / sub).mkdir(parents=True, exist_ok=True)
    names = demo_class_names()
    with multiprocessing.get_context('fork').Pool(workers or os.cpu_count()) as pool:
        for split, n in (('train', train), ('val', val)):
            jobs = [(seed, split, i, side) for i in range(n)]
            meta, tar = [], None
            for i, (jpeg, caption, label) in enumerate(pool.imap(_demo_pair, jobs, chunksize=64)):
                name = f'{split}_{i:06d}.jpg'
                (out / split / name).write_bytes(jpeg)
                rec = {'filename': name, 'caption': caption} if split == 'train' else {
                    'filename': name, 'label': label, 'label_name': names[label], 'caption': caption}
                meta.append(json.dumps(rec))
                if split == 'train':
                    if i % shard_size == 0:
                        if tar is not None:
                            tar.close()
                        tar = tarfile.open(out / 'shards' / f'demo-{i // shard_size:06d}.tar', 'w')
                    for ext, payload in (('jpg', jpeg), ('txt', caption.encode()), ('json', json.dumps(rec).encode())):
                        info = tarfile.TarInfo(f'{i:06d}.{ext}')
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
                if (i + 1) % 5000 == 0:
                    print(f'  {split}: {i + 1}/{n}', flush=True)
            if tar is not None:
                tar.close()
            (out / f'{split}.jsonl').write_text('\n'.join(meta) + '\n')
    (out / 'classnames.txt').write_text('\n'.join(names) + '\n')
    print(f'demo data: {train} train / {val} val pairs in {out}')
