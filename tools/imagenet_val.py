"""imagenet-val: evaluation JSON Lines for ImageNet's validation images, from an ImageFolder tree
or from the flat val folder with the devkit's ground truth and meta.mat (read here: a small
MATLAB 5 reader, no scipy).

    python tools/imagenet_val.py --val_root /data/imagenet/val --out /data/imagenet/val.jsonl
        # flat folder: add --ground_truth ILSVRC2012_validation_ground_truth.txt --devkit_meta meta.mat
"""
import json
import math
import re
import struct
import sys
import zlib
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the library beside tools/, run as a script

import data  # noqa: E402
import images  # noqa: E402
from tools import write_atomic  # noqa: E402

FLAGS = flags.FLAGS

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
    write_atomic(Path(out), ('\n'.join(lines) + '\n').encode())
    print(f'imagenet-val: {len(lines)} images of {len(set(w for _, w in pairs))} classes -> {out}'
          + (f'; {missing} listed in {ground_truth} but not in {root}, left out' if missing else ''))
    return len(lines), missing


def main(argv):
    if len(argv) != 1:
        raise app.UsageError(f'no arguments besides the flags (got {argv[1:]})')
    imagenet_val(FLAGS.val_root, FLAGS.out or data.DATA_DIR / 'imagenet_val.jsonl',
                 ground_truth=FLAGS.ground_truth or None, devkit_meta=FLAGS.devkit_meta or None)


if __name__ == '__main__':
    flags.DEFINE_string('val_root', '', 'the ImageFolder tree or flat folder of the validation images')
    flags.DEFINE_string('out', None, 'output (default: data/imagenet_val.jsonl)')
    flags.DEFINE_string('ground_truth', '', "the devkit's ILSVRC2012_validation_ground_truth.txt")
    flags.DEFINE_string('devkit_meta', '', "the devkit's data/meta.mat")
    app.run(main)
