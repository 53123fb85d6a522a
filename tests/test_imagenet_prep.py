"""`tools/imagenet_val.py`: evaluation JSON Lines from ImageNet's two usual validation layouts.
The devkit's meta.mat is written here by a small MATLAB 5 writer that follows the format's
specification (tags, 8-byte padding, the 4-byte small-element form, compressed elements, doubles
stored as uint16 as MATLAB stores them), with the synsets in an order that is not the sorted one."""
import json
import os
import random
import struct
import zlib

import pytest

import evaluate
from helpers import ROOT, run, write_jpeg
from tools import imagenet_val

WNIDS = [f'n{10_000_000 + 7 * i:08d}' for i in range(1000)]      # sorted, as ImageNet's are


def _element(kind, payload, small=False):
    if small:                                   # size and type in one 4-byte word, data in the next 4
        return struct.pack('<HH', kind, len(payload)) + payload.ljust(4, b'\0')
    return struct.pack('<II', kind, len(payload)) + payload + b'\0' * (-len(payload) % 8)


def _matrix(cls, dims, name, body):
    header = (_element(6, struct.pack('<II', cls, 0)) + _element(5, struct.pack(f'<{len(dims)}i', *dims))
              + _element(1, name.encode(), small=len(name) <= 4))
    return _element(14, header + body)


def _number(value):      # a 1x1 double, stored as uint16
    return _matrix(6, (1, 1), '', _element(4, struct.pack('<H', value), small=True))


def _chars(text):        # a 1xN char array, UTF-16 code units
    return _matrix(4, (1, len(text)), '', _element(4, text.encode('utf-16-le')))


def write_meta_mat(path, synsets):
    fields = ['ILSVRC2012_ID', 'WNID', 'words', 'children']
    body = (_element(5, struct.pack('<i', 32), small=True) + _element(1, b''.join(f.encode().ljust(32, b'\0') for f in fields))
            + b''.join(_number(i) + _chars(w) + _chars(f'class {w}') + _matrix(6, (1, 0), '', _element(9, b''))
                       for i, w in synsets))
    matrix = _matrix(2, (len(synsets), 1), 'synsets', body)
    header = b'MATLAB 5.0 MAT-file, written by the test'.ljust(116) + b'\0' * 8 + struct.pack('<H', 0x0100) + b'IM'
    compressed = zlib.compress(matrix)
    path.write_bytes(header + struct.pack('<II', 15, len(compressed)) + compressed)


@pytest.fixture
def devkit(tmp_path):
    """(meta.mat, names file, devkit order): ids 1..1000 in a shuffled synset order, plus a non-leaf synset."""
    order = WNIDS[:]
    random.Random(0).shuffle(order)
    meta = tmp_path / 'meta.mat'
    write_meta_mat(meta, [(i + 1, w) for i, w in enumerate(order)] + [(1001, 'n09999999')])
    names = tmp_path / 'names.txt'
    names.write_text(''.join(f'name of {w}\n' for w in WNIDS))
    return meta, names, order


def test_flat_folder_labels_follow_the_devkit_ids_through_meta_mat(tmp_path, devkit):
    meta, names, order = devkit
    assert imagenet_val.devkit_wnids(meta) == {i + 1: w for i, w in enumerate(order)}
    ids = [5, 1000, 1, 5, 333, 42]
    (tmp_path / 'gt.txt').write_text(''.join(f'{i}\n' for i in ids))
    val = tmp_path / 'val'
    val.mkdir()
    for n in (1, 2, 3, 4, 6):                                   # image 5 is missing: counted, left out
        write_jpeg(val / f'ILSVRC2012_val_{n:08d}.JPEG')
    out = tmp_path / 'val.jsonl'
    assert imagenet_val.imagenet_val(val, out, ground_truth=tmp_path / 'gt.txt', devkit_meta=meta, names=names) == (5, 1)
    records, _ = evaluate.read_eval_meta(out)
    want = [(n, WNIDS.index(order[ids[n - 1] - 1])) for n in (1, 2, 3, 4, 6)]
    assert [(r['filename'], r['label'], r['label_name']) for r in records] == [
        (f'ILSVRC2012_val_{n:08d}.JPEG', label, f'name of {WNIDS[label]}') for n, label in want]
    assert records[0]['label'] != ids[0] - 1                    # the devkit id is not the label


def test_image_folder_tree_labels_are_the_sorted_wnid_index(tmp_path, devkit):
    _, names, _ = devkit
    val = tmp_path / 'val'
    for w in WNIDS:
        (val / w).mkdir(parents=True)
    (val / 'not_a_class').mkdir()
    write_jpeg(val / WNIDS[7] / 'b.JPEG')
    write_jpeg(val / WNIDS[7] / 'a.JPEG')
    write_jpeg(val / WNIDS[999] / 'c.jpg')
    (val / WNIDS[999] / 'notes.txt').write_text('not an image')
    out = tmp_path / 'val.jsonl'
    assert imagenet_val.imagenet_val(val, out, names=names) == (3, 0)
    records, _ = evaluate.read_eval_meta(out)
    assert [(r['filename'], r['label'], r['label_name']) for r in records] == [
        (f'{WNIDS[7]}/a.JPEG', 7, f'name of {WNIDS[7]}'), (f'{WNIDS[7]}/b.JPEG', 7, f'name of {WNIDS[7]}'),
        (f'{WNIDS[999]}/c.jpg', 999, f'name of {WNIDS[999]}')]
    os.rmdir(val / WNIDS[3])
    with pytest.raises(SystemExit, match='999 class folders'):
        imagenet_val.imagenet_val(val, out, names=names)


def test_bad_inputs_are_named(tmp_path, devkit):
    meta, names, _ = devkit
    val = tmp_path / 'val'
    val.mkdir()
    (tmp_path / 'gt.txt').write_text('1\n7\nabc\n')
    with pytest.raises(SystemExit, match=r'gt.txt: entry 3: expected a class id 1..1000'):
        imagenet_val.imagenet_val(val, tmp_path / 'o.jsonl', ground_truth=tmp_path / 'gt.txt', devkit_meta=meta, names=names)
    with pytest.raises(SystemExit, match='needs --devkit_meta'):
        imagenet_val.imagenet_val(val, tmp_path / 'o.jsonl', ground_truth=tmp_path / 'gt.txt', names=names)
    os.mkfifo(tmp_path / 'fifo')
    with pytest.raises(SystemExit, match='cannot read .*fifo'):
        imagenet_val.devkit_wnids(tmp_path / 'fifo')
    torn = tmp_path / 'torn.mat'
    torn.write_bytes(meta.read_bytes()[:400])
    with pytest.raises(ValueError, match='torn.mat: not the devkit'):
        imagenet_val.devkit_wnids(torn)
    (tmp_path / 'text.mat').write_text('hello')
    with pytest.raises(ValueError, match='text.mat: not a little-endian MATLAB 5 file'):
        imagenet_val.devkit_wnids(tmp_path / 'text.mat')
    short = tmp_path / 'short.mat'
    write_meta_mat(short, [(i + 1, w) for i, w in enumerate(WNIDS[:999])])
    with pytest.raises(ValueError, match='not 1,000 distinct'):
        imagenet_val.devkit_wnids(short)
    with pytest.raises(SystemExit, match='is not a folder'):
        imagenet_val.imagenet_val(tmp_path / 'nowhere', tmp_path / 'o.jsonl', names=names)


def test_the_command_line_writes_the_file(tmp_path):
    """The real class-name asset and the flags, through the tool's command line."""
    val = tmp_path / 'val'
    for w in WNIDS:
        (val / w).mkdir(parents=True)
    write_jpeg(val / WNIDS[0] / 'x.JPEG')
    out = tmp_path / 'imagenet_val.jsonl'
    result = run([str(ROOT / 'tools' / 'imagenet_val.py'), f'--val_root={val}', f'--out={out}'])
    assert result.returncode == 0, result.stderr
    rec = json.loads(out.read_text())
    assert rec == {'filename': f'{WNIDS[0]}/x.JPEG', 'label': 0, 'label_name': 'tench'}
