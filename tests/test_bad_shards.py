"""Bad webdataset shards and members (cut, captionless, links, folders, no good neighbour) are counted and replaced."""
import io
import tarfile

import pytest

import data
import guard
import loader
from helpers import bad_totals, data_config, run, scalars, write_jpeg


def test_webdataset_missing_text_and_corrupt_member(tmp_path):
    buf = io.BytesIO()
    write_jpeg(buf)
    jpeg = buf.getvalue()
    with tarfile.open(tmp_path / 'a.tar', 'w') as tar:
        for name, payload in [('000.jpg', jpeg), ('000.txt', b'good one'), ('001.jpg', jpeg),
                              ('002.jpg', jpeg), ('002.txt', b'good two')]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    raw = (tmp_path / 'a.tar').read_bytes()
    (tmp_path / 'b.tar').write_bytes(raw[:512 * 3 + 100])  # cut inside the second member
    cfg = data_config(format='wds', shards=str(tmp_path / '*.tar'), eda=False, mask=False, batch_size=2,
                      bad_window=1000)
    batches = [b for _, b in zip(range(4), loader.build_train_loader(cfg, rank=0, world=1, start_step=0, max_iter=4))]
    total = dict(zip(guard.BAD_KINDS, sum(b['bad'] for b in batches).tolist()))
    assert total['bad_tar'] >= 2 and sum(total.values()) == total['bad_tar']
    assert all(b['images'].shape == (2, 2, 3, 32, 32) for b in batches)


def test_broken_shards_train_through(tmp_path, demo_dir):
    shards = tmp_path / 'shards'
    shards.mkdir()
    good = (demo_dir / 'shards' / 'demo-000000.tar').read_bytes()
    (shards / 'a.tar').write_bytes(good[:len(good) // 20])      # a dozen samples, then cut mid-member
    with tarfile.open(shards / 'b.tar', 'w') as out, tarfile.open(demo_dir / 'shards' / 'demo-000000.tar') as src:
        for member in src.getmembers()[:12]:                     # 4 samples; the last one lacks its .txt
            if member.name != src.getmembers()[11].name or not member.name.endswith('.txt'):
                out.addfile(member, src.extractfile(member))
    res = run(['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(tmp_path / 'run'),
               '--config.data.format=wds', f'--config.data.shards={shards}/*.tar', '--config.data.val_meta=',
               '--config.log_every=1', '--config.data.limits.bad_window=1000'])
    assert res.returncode == 0, res.stderr[-3000:]
    counts, _ = scalars(tmp_path / 'run', 'samples/bad_tar')
    assert max(counts.values()) > 0


def jpeg_bytes(seed):
    buf = io.BytesIO()
    write_jpeg(buf, size=(40, 40), seed=seed)
    return buf.getvalue()


def add_member(tar, name, payload=b'', kind=tarfile.REGTYPE):
    """A file member, or a directory / symlink / hard link (to 0.jpg) with no data."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(payload) if kind == tarfile.REGTYPE else 0
    info.linkname = '' if kind in (tarfile.REGTYPE, tarfile.DIRTYPE) else '0.jpg'
    tar.addfile(info, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)


BAD_MEMBERS = {   # sample 1's members, and the kind it is counted as
    'no_extension': ([('1', b'x')], 'bad_tar'),
    'binary_caption': ([('1.jpg', None), ('1.txt', b'\xff\xfe caption')], 'bad_encoding'),
    'blank_caption': ([('1.jpg', None), ('1.txt', b' \t\n')], 'empty_caption'),
    'hard_link': ([('1.jpg', {'kind': tarfile.LNKTYPE}), ('1.txt', b'one')], 'bad_tar'),
    'directory': ([('1.jpg', {'kind': tarfile.DIRTYPE}), ('1.txt', b'one')], 'bad_tar'),
    'symlink': ([('1.jpg', {'kind': tarfile.SYMTYPE}), ('1.txt', b'one')], 'bad_tar'),
}


def wds_batches(cfg, steps):
    return [b for _, b in zip(range(steps), loader.build_train_loader(cfg, rank=0, world=1, start_step=0,
                                                                    max_iter=steps))]


def write_tiny_shard(path, layout, bad):
    """A shard of samples 0, 1, ...: 'g' a good pair, 'b' one whose members are BAD_MEMBERS[bad]."""
    with tarfile.open(path, 'w') as tar:
        for i, what in enumerate(layout):
            members = [(f'{i}.jpg', None), (f'{i}.txt', f'caption {i}'.encode())] if what == 'g' else [
                (name.replace('1', str(i), 1), payload) for name, payload in BAD_MEMBERS[bad][0]]
            for name, payload in members:
                if isinstance(payload, dict):
                    add_member(tar, name, **payload)
                else:
                    add_member(tar, name, jpeg_bytes(i) if payload is None else payload)


@pytest.mark.parametrize('bad', sorted(BAD_MEMBERS))
@pytest.mark.parametrize('layout', ['gb', 'gbb', 'bg'])
def test_a_tiny_shard_with_bad_members_trains_on_counting_them(tmp_path, layout, bad):
    """A batch of two from a 2-3 sample shard whose only other samples are bad: the bad ones are
    counted by kind and replaced (by the one good sample, repeated: nothing else can be built)."""
    write_tiny_shard(tmp_path / 'a.tar', layout, bad)
    cfg = data_config(format='wds', shards=str(tmp_path / 'a.tar'), eda=False, mask=False, batch_size=2,
                      bad_window=1000, shuffle_buffer=1)
    batches = wds_batches(cfg, 3)
    good = f'caption {layout.index("g")}'
    tok = data.get_tokenizer()
    assert all(''.join(tok.decode(t).split()) == good.replace(' ', '') for b in batches for t in b['text'])
    counts = bad_totals(batches)
    assert set(counts) == {BAD_MEMBERS[bad][1]} and counts[BAD_MEMBERS[bad][1]] >= 3


def test_a_bad_neighbourhood_takes_a_replacement_from_elsewhere_in_the_shards(tmp_path):
    """Eleven bad samples, then a good one: batches of two whose neighbours and shuffle buffer hold
    only bad samples take the good one from the worker's shards; a shard with no good sample at
    all is a clear error; so is a rate limit passed."""
    write_tiny_shard(tmp_path / 'a.tar', 'b' * 11 + 'g', 'binary_caption')
    cfg = data_config(format='wds', shards=str(tmp_path / 'a.tar'), eda=False, mask=False, batch_size=2,
                      bad_window=1000, max_bad_rate=1.0, shuffle_buffer=1)
    assert bad_totals(wds_batches(cfg, 2))['bad_encoding'] >= 4
    write_tiny_shard(tmp_path / 'a.tar', 'b' * 12, 'binary_caption')
    with pytest.raises(guard.DataError, match='no good sample to replace .*first 1,000 of loader worker 0'):
        wds_batches(cfg, 1)
    write_tiny_shard(tmp_path / 'a.tar', 'b' * 11 + 'g', 'binary_caption')
    cfg.limits.update(dict(bad_window=10, max_bad_rate=0.5))
    with pytest.raises(guard.DataError, match='of the last 10 samples could not be built'):
        wds_batches(cfg, 2)
