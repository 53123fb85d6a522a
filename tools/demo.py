"""The generated demo corpus: a grid of copies of one shape on a plain or textured background. The
zero-shot class is the shape; colour, size, count and background are nuisances the captions may
mention. The shapes are mirror-symmetric, stand out in grey, and a 0.2-area crop holds most of a
copy or parts of several, so the label survives the MoCo v2 views (crop, flip, colour jitter,
grayscale, blur). `python tools/prepare.py make-demo` writes it."""
import json
import math
import os
from pathlib import Path

import seeds

# class word -> other words a caption may use for it (one caption in four does). Every shape is
# mirror-symmetric about the vertical axis, so a horizontal flip never turns one class into another.
DEMO_SHAPES = {'circle': ('disc', 'dot'), 'ring': ('hoop', 'donut'), 'square': ('box', 'block'),
               'diamond': ('rhombus', 'lozenge'), 'triangle': ('wedge', 'pyramid'), 'cross': ('plus sign', 'plus'),
               'star': ('sparkle', 'pentagram'), 'heart': ('valentine', 'love symbol'),
               'crescent': ('moon', 'sickle'), 'arrow': ('pointer', 'dart')}
# colour word -> (RGB, other words): a nuisance, drawn at random, named by most captions
DEMO_COLORS = {'red': ((215, 35, 35), ('crimson', 'scarlet')), 'orange': ((240, 130, 20), ('amber', 'tangerine')),
               'yellow': ((240, 205, 25), ('golden', 'lemon')), 'green': ((35, 165, 55), ('emerald', 'grass green')),
               'blue': ((40, 75, 225), ('cobalt', 'deep blue')), 'purple': ((140, 50, 190), ('violet', 'plum'))}
DEMO_BACKGROUNDS = {'white': ((232, 232, 228), 'plain'), 'paper': ((225, 215, 190), 'noisy'),
                    'lined': ((228, 228, 220), 'stripes'), 'black': ((28, 28, 32), 'plain'),
                    'slate': ((45, 52, 60), 'noisy'), 'checked': ((38, 38, 42), 'checks')}
MIN_CONTRAST = 70    # grey-level difference of shape and background: the shape survives grayscale
# grid side -> (size word, count word): n x n copies, one per cell; a 0.2-area crop (0.45 of the
# side) always holds the centre of a copy of a 3 x 3 grid and most of one of a 2 x 2 grid
DEMO_GRIDS = {2: ('large', 'four'), 3: ('small', 'nine')}
DEMO_TEMPLATES = (
    'a pattern of {count} {color} {shape} shapes on a {bg} background',
    '{count} {color} {shape} stickers on a {bg} sheet',
    'wallpaper with a {color} {shape} repeated {count} times',
    'a {shape} pattern in {color}',
    'i stamped a {size} {shape} {count} times in {color} ink',
    'fabric printed with a {color} {shape} motif',
    'the same {shape} again and again, {color} on {bg}',
    'clip art: {count} {size} {shape} icons, {color}',
    'a grid of {size} {shape} shapes',
    'look at all these {shape} symbols!',
    'tiles, each with a {color} {shape} on it',
    '{shape} motif, {size}, on a {bg} backdrop',
)
_ARM = 0.34
_STAR = [(0.45 if k % 2 else 1.0, math.radians(-90 + 36 * k)) for k in range(10)]   # (radius, angle) of its corners
# unit outlines (radius about 1, y down) of the polygon shapes; circle, ring and crescent are ellipses
DEMO_OUTLINES = {
    'square': ((-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)),
    'diamond': ((0, -1.05), (0.7, 0), (0, 1.05), (-0.7, 0)),
    'triangle': ((0.0, -1.05), (0.95, 0.7), (-0.95, 0.7)),
    'cross': ((-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM), (_ARM, 1),
              (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)),
    'star': tuple((r * math.cos(a), r * math.sin(a) + 0.1) for r, a in _STAR),
    'heart': tuple((16 * math.sin(t) ** 3 / 16.5, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                                  - math.cos(4 * t)) / 16.5 - 0.1)
                   for t in (2 * math.pi * k / 48 for k in range(48))),
    'arrow': ((0, -1.05), (0.85, -0.1), (0.33, -0.1), (0.33, 1), (-0.33, 1), (-0.33, -0.1), (-0.85, -0.1))}


def demo_class_names():
    """Zero-shot classes, label order: the shapes ('circle', ...)."""
    return list(DEMO_SHAPES)


def _grey(rgb):
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def demo_spec(seed, split, i):
    """What sample i of a split shows and says, deterministic from (seed, split, i). Classes take
    turns (i modulo the class count), so they are balanced; colour, grid and background are drawn,
    the background among those that contrast with the colour in grey."""
    rng = seeds.seeded_rng(seed, split, i)
    label = i % len(DEMO_SHAPES)
    shape, color, grid = list(DEMO_SHAPES)[label], rng.choice(list(DEMO_COLORS)), rng.choice(list(DEMO_GRIDS))
    rgb = DEMO_COLORS[color][0]
    bg = rng.choice([b for b, (base, _) in DEMO_BACKGROUNDS.items() if abs(_grey(base) - _grey(rgb)) >= MIN_CONTRAST])
    size, count = DEMO_GRIDS[grid]

    def word(name, others):
        return name if rng.random() < 0.75 else rng.choice(others)
    caption = rng.choice(DEMO_TEMPLATES).format(color=word(color, DEMO_COLORS[color][1]), size=size, count=count,
                                                bg=bg, shape=word(shape, DEMO_SHAPES[shape]))
    copies = [(rng.uniform(-0.12, 0.12), rng.uniform(-0.12, 0.12), rng.uniform(0.3, 0.38), rng.uniform(-15, 15))
              for _ in range(grid * grid)]          # per copy: centre offset and radius (of the cell), angle
    return dict(label=label, shape=shape, color=color, grid=grid, bg=bg, caption=caption, copies=copies,
                noise=rng.randrange(1 << 32))


def demo_placements(spec, side):
    """(cx, cy, r, angle) in pixels and degrees of each copy: one per cell of the grid, which leaves a
    margin of 0.06 of the side (the evaluation's centre crop keeps 0.88 of it)."""
    cell = side * 0.88 / spec['grid']
    return [(side * 0.06 + cell * (k % spec['grid'] + 0.5 + dx), side * 0.06 + cell * (k // spec['grid'] + 0.5 + dy),
             cell * r, angle) for k, (dx, dy, r, angle) in enumerate(spec['copies'])]


def demo_mask(spec, side, *, supersample=4):
    """The copies' coverage in [0, 1], side x side, drawn supersampled (smooth edges at 80 px)."""
    import numpy as np
    from PIL import Image, ImageDraw
    big = side * supersample
    mask = Image.new('L', (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for cx, cy, r, angle in demo_placements(spec, big):
        if spec['shape'] in ('circle', 'ring', 'crescent'):
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
            hole = {'ring': (0, 0.55), 'crescent': (-0.5 * r, 0.8)}.get(spec['shape'])
            if hole:    # the ring's hole; the crescent's bite from above (it opens upwards)
                dy, hr = hole[0], hole[1] * r
                draw.ellipse((cx - hr, cy + dy - hr, cx + hr, cy + dy + hr), fill=0)
            continue
        cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        draw.polygon([(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos))
                      for x, y in DEMO_OUTLINES[spec['shape']]], fill=255)
    return np.asarray(mask.resize((side, side), Image.BOX), np.float32) / 255


def demo_image(spec, side):
    """The picture of a demo_spec: a plain, noisy, lined or checked background and the copies of the
    shape in a shade of the colour, side x side RGB."""
    import numpy as np
    from PIL import Image
    base, pattern = DEMO_BACKGROUNDS[spec['bg']]
    nrng = np.random.default_rng(spec['noise'])
    pixels = np.asarray(base, np.float32) + nrng.normal(0, 12 if pattern == 'noisy' else 4, (side, side, 3))
    rows, cols = np.indices((side, side)) * 10 // side       # 10 stripes / a 10 x 10 board at any side
    if pattern == 'stripes':
        pixels[rows % 2 == 0] -= 18
    elif pattern == 'checks':
        pixels[(rows + cols) % 2 == 0] += 18
    fill = np.asarray(DEMO_COLORS[spec['color']][0]) + nrng.integers(-15, 16, 3)     # a shade of the colour
    mask = demo_mask(spec, side)[..., None]
    pixels = pixels * (1 - mask) + fill * mask
    return Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8))


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
