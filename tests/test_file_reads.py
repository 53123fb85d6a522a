"""Only regular files are read, reads bounded: FIFOs, devices, folders, oversized files are counted samples."""
import io
import os
import tarfile

import pytest

import guard
import loader
from helpers import bad_totals, data_config, one_pass, write_jpeg, write_meta


def test_only_regular_files_are_read_and_reads_are_bounded(tmp_path):
    os.mkfifo(tmp_path / 'fifo')
    (tmp_path / 'folder').mkdir()
    os.symlink(tmp_path / 'fifo', tmp_path / 'link')
    (tmp_path / 'big').write_bytes(b'x' * 1001)
    (tmp_path / 'fits').write_bytes(b'x' * 1000)
    for path in ('/dev/zero', tmp_path / 'fifo', tmp_path / 'link', tmp_path / 'folder'):
        with pytest.raises(guard.BadSample) as e:
            guard.read_file(path, max_bytes=1000)
        assert e.value.kind == 'not_regular', path
    with pytest.raises(guard.BadSample, match='file_too_large'):
        guard.read_file(tmp_path / 'big', max_bytes=1000)
    assert guard.read_file(tmp_path / 'fits', max_bytes=1000) == b'x' * 1000
    with pytest.raises(guard.BadSample, match='missing'):
        guard.read_file(tmp_path / 'fits' / 'below', max_bytes=1000)
    # a meta line naming /dev/zero under the root '/': a counted sample, not an endless read
    write_meta(tmp_path / 'meta.jsonl', [{'filename': '/dev/zero', 'caption': 'zeros'}])
    ds = loader.train_dataset(data_config(train_root='/', train_meta=str(tmp_path / 'meta.jsonl'), max_bad_rate=1.0))
    with pytest.raises(guard.DataError, match='100 consecutive bad samples'):
        ds[(0, 0)]
    assert list(ds.monitor.examples)[-1].startswith(f'{tmp_path}/meta.jsonl:1: not_regular: /dev/zero')


@pytest.mark.parametrize('workers', [0, 2])
def test_fifo_folder_and_oversized_images_are_counted_samples(tmp_path, workers):
    root = tmp_path / 'images'
    root.mkdir()
    write_jpeg(root / 'good.jpg', size=(40, 40))
    write_jpeg(root / 'big.jpg', size=(400, 400), seed=1)
    os.mkfifo(root / 'fifo.jpg')
    (root / 'folder.jpg').mkdir()
    os.symlink('fifo.jpg', root / 'to_fifo.jpg')
    names = ['good.jpg', 'fifo.jpg', 'folder.jpg', 'to_fifo.jpg', 'big.jpg', 'good.jpg', 'good.jpg', 'good.jpg']
    write_meta(tmp_path / 'meta.jsonl', [{'filename': n, 'caption': 'a red square'} for n in names])
    max_bytes = (root / 'good.jpg').stat().st_size + 10
    assert (root / 'big.jpg').stat().st_size > max_bytes
    cfg = data_config(train_root=str(root), train_meta=str(tmp_path / 'meta.jsonl'), workers=workers,
                      batch_size=4, bad_window=1000, max_file_bytes=max_bytes)
    ds = loader.train_dataset(cfg)
    for i, kind in enumerate([None, 'not_regular', 'not_regular', 'not_regular', 'file_too_large']):
        bad = dict(zip(guard.BAD_KINDS, ds[(i, i)]['bad'].tolist()))
        assert (bad[kind] >= 1) if kind else sum(bad.values()) == 0, (i, bad)
    assert set(bad_totals(one_pass(cfg, 8))) == {'not_regular', 'file_too_large'}


def test_fifo_shard_and_oversized_member_are_counted(tmp_path):
    buf = io.BytesIO()
    write_jpeg(buf, size=(40, 40))
    small = buf.getvalue()
    buf = io.BytesIO()
    write_jpeg(buf, size=(400, 400))
    with tarfile.open(tmp_path / 'a.tar', 'w') as tar:
        for name, payload in [('0.jpg', small), ('0.txt', b'one'), ('1.jpg', buf.getvalue()), ('1.txt', b'two'),
                              ('2.jpg', small), ('2.txt', b'three')]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    os.mkfifo(tmp_path / 'b.tar')
    cfg = data_config(format='wds', shards=str(tmp_path / '*.tar'), eda=False, mask=False, batch_size=2,
                      bad_window=1000, max_file_bytes=len(small) + 10)
    batches = [b for _, b in zip(range(3), loader.build_train_loader(cfg, rank=0, world=1, start_step=0, max_iter=3))]
    assert set(bad_totals(batches)) == {'not_regular', 'file_too_large'}
    assert all(b['images'].shape == (2, 2, 3, 32, 32) for b in batches)
