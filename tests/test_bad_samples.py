"""Bad samples of a meta-file corpus are counted by kind and replaced, in a run too; a mostly-bad one stops clearly."""
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import guard
import loader
import text
from helpers import data_config, run, scalars, write_half_missing_corpus, write_jpeg


def png_with_declared_size(width, height):
    """A tiny PNG whose header claims width x height (a decompression bomb)."""
    buf = io.BytesIO()
    Image.new('L', (1, 1)).save(buf, format='PNG')
    raw = bytearray(buf.getvalue())
    ihdr = raw[12:29]
    ihdr[4:12] = struct.pack('>II', width, height)
    raw[12:29] = ihdr
    raw[29:33] = struct.pack('>I', zlib.crc32(bytes(ihdr)))
    return bytes(raw)


def build_bad_corpus(root):
    """(meta lines, expected kind or None per line)."""
    rng = np.random.default_rng(0)
    good = root / 'good.jpg'
    write_jpeg(good)
    full = good.read_bytes()
    (root / 'truncated.jpg').write_bytes(full[:len(full) // 2])
    (root / 'zero.jpg').write_bytes(b'')
    (root / 'text.jpg').write_text('this is not an image')
    Image.new('CMYK', (40, 30), (10, 200, 30, 0)).save(root / 'cmyk.jpg')
    Image.fromarray((rng.integers(0, 65535, (30, 40))).astype(np.uint16)).save(root / 'sixteen.png')
    pal = Image.new('P', (40, 30))
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.info['transparency'] = 0
    pal.save(root / 'palette.png', transparency=0)
    Image.new('L', (40, 30), 128).save(root / 'gray.jpg')
    (root / 'bomb.png').write_bytes(png_with_declared_size(60_000, 60_000))
    Image.new('RGB', (1, 1), (9, 9, 9)).save(root / 'one.png')
    items = [
        ({'filename': 'truncated.jpg', 'caption': 'x'}, 'truncated'),
        ({'filename': 'zero.jpg', 'caption': 'x'}, 'empty_file'),
        ({'filename': 'missing.jpg', 'caption': 'x'}, 'missing'),
        ({'filename': 'text.jpg', 'caption': 'x'}, 'not_image'),
        ({'filename': 'cmyk.jpg', 'caption': 'cmyk'}, None),
        ({'filename': 'sixteen.png', 'caption': 'sixteen bit'}, None),
        ({'filename': 'palette.png', 'caption': 'palette'}, None),
        ({'filename': 'gray.jpg', 'caption': 'gray'}, None),
        ({'filename': 'bomb.png', 'caption': 'x'}, 'too_large'),
        ({'filename': 'one.png', 'caption': 'one pixel'}, None),
        ({'filename': 'good.jpg', 'caption': ''}, 'empty_caption'),
        ({'filename': 'good.jpg', 'caption': '   \t '}, 'empty_caption'),
        ({'filename': 'good.jpg', 'caption': '一只红色的猫'}, None),
        ({'filename': 'good.jpg', 'caption': ' '.join(['word'] * 500)}, None),
        ('{"filename": "good.jpg", "caption": ', 'bad_json'),
        (b'{"filename": "good.jpg", "caption": "\xff\xfe"}', 'bad_encoding'),
    ]
    lines = [json.dumps(rec).encode() if isinstance(rec, dict) else rec if isinstance(rec, bytes)
             else rec.encode() for rec, _ in items]
    (root / 'meta.jsonl').write_bytes(b'\n'.join(lines) + b'\n')
    return [kind for _, kind in items]


def test_every_bad_kind_is_counted_and_replaced(tmp_path):
    kinds = build_bad_corpus(tmp_path)
    cfg = data_config(train_root=str(tmp_path), train_meta=str(tmp_path / 'meta.jsonl'), bad_window=1000)
    ds = loader.train_dataset(cfg)
    for i, kind in enumerate(kinds):
        sample = ds[(i, 1000 + i)]
        assert sample['images'].shape == (2, 3, 32, 32)
        bad = dict(zip(guard.BAD_KINDS, sample['bad'].tolist()))
        if kind is None:
            assert sum(bad.values()) == 0, (i, bad)
        else:
            assert bad[kind] >= 1, (i, kind, bad)
    long = ds[(13, 5)]['text']
    assert long[0] == text.SOT_ID and long[76] == text.EOT_ID           # truncated, not rejected
    assert ds[(12, 5)]['text'][1] != text.EOT_ID                        # CJK caption kept


def test_loader_sums_counts_per_batch(tmp_path):
    kinds = build_bad_corpus(tmp_path)
    cfg = data_config(train_root=str(tmp_path), train_meta=str(tmp_path / 'meta.jsonl'), bad_window=1000,
                      batch_size=8)
    batches = loader.build_train_loader(cfg, rank=0, world=1, start_step=0, max_iter=10)
    total = sum(b['bad'] for b in batches)
    counted = dict(zip(guard.BAD_KINDS, total.tolist()))
    for kind in set(k for k in kinds if k):
        assert counted[kind] > 0, kind
    assert counted['other'] == 0


def test_mostly_bad_corpus_stops_with_examples(tmp_path):
    write_half_missing_corpus(tmp_path)
    cfg = data_config(train_root=str(tmp_path), train_meta=str(tmp_path / 'meta.jsonl'), bad_window=20,
                      max_bad_rate=0.2)
    with pytest.raises(guard.DataError, match=r'(?s)could not be built.*missing: .*\.jpg'):
        for _ in loader.build_train_loader(cfg, rank=0, world=1, start_step=0, max_iter=50):
            pass


def test_bad_corpus_trains_through_and_counts_every_kind(tmp_path):
    root = tmp_path / 'corpus'
    root.mkdir()
    kinds = {k for k in build_bad_corpus(root) if k}
    res = run(['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(tmp_path / 'run'),
               f'--config.data.train_root={root}', f'--config.data.train_meta={root / "meta.jsonl"}',
               '--config.data.val_meta=', '--config.log_every=1', '--config.max_iter=12',
               '--config.data.limits.bad_window=1000'])
    assert res.returncode == 0, res.stderr[-3000:]
    for kind in kinds:
        counts, _ = scalars(tmp_path / 'run', f'samples/{kind}')
        assert counts[12] > 0, kind
    _, tags = scalars(tmp_path / 'run', 'samples/bad_total')
    assert 'samples/other' not in tags['scalars']   # a kind is logged once it occurs


def test_mostly_bad_corpus_stops_with_a_clear_message(tmp_path):
    write_half_missing_corpus(tmp_path)
    res = run(['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(tmp_path / 'run'),
               f'--config.data.train_root={tmp_path}', f'--config.data.train_meta={tmp_path / "meta.jsonl"}',
               '--config.data.val_meta=', '--config.data.limits.bad_window=20', '--config.data.limits.max_bad_rate=0.2'])
    assert res.returncode != 0
    assert 'could not be built' in res.stderr and 'missing:' in res.stderr and '.jpg' in res.stderr
