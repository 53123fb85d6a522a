"""Data fidelity: the CLIP baseline's crops (no flip, no colour op) on every path, webdataset bad
samples replaced without duplicates, the shuffle buffer, brace patterns in data.shards."""
import io
import json
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import checks
import data
import guard
import images
import jpeg
import loader
import seeds
import shards
import text
import trainstep
from configs import clip_vitb32
from helpers import data_config, write_jpeg

CPU = torch.device('cpu')


def asymmetric(i, size=(80, 60)):
    """An image that a horizontal flip changes everywhere: a left-to-right ramp plus noise."""
    w, h = size
    ramp = np.linspace(0, 200, w)[None, :, None] + np.array([0, 30, 60])[None, None, :]
    noise = np.random.default_rng(i).integers(0, 40, (h, w, 3))
    return Image.fromarray((ramp + noise).clip(0, 255).astype(np.uint8))


def image_bytes(img, fmt):
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=95)
    return buf.getvalue()


def clip_config(**data_overrides):
    """The ViT-B/32 CLIP baseline config, smoke-sized, on a test corpus."""
    cfg = clip_vitb32.get_config('smoke')
    cfg.data.update({'workers': 0, 'batch_size': 6, **data_overrides})
    cfg.data.limits.bad_window = 1000
    return cfg


def write_pairs(folder, n=8, fmt='PNG'):
    """n asymmetric images with captions 'picture<i>'; returns {caption: encoded image}."""
    pairs, lines = {}, []
    for i in range(n):
        name, caption = f'{i}.{fmt.lower()}', f'picture{i}'
        pairs[caption] = image_bytes(asymmetric(i), fmt)
        (folder / name).write_bytes(pairs[caption])
        lines.append(json.dumps({'filename': name, 'caption': caption}))
    (folder / 'meta.jsonl').write_text('\n'.join(lines) + '\n')
    return pairs


def write_tar(path, members):
    with tarfile.open(path, 'w') as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def unflipped(raw, rng, *, size, scale):
    """The view RandomResizedCrop(size, scale) alone makes of an image with `rng` (no flip)."""
    img = images.to_rgb(guard.open_image(raw, 1 << 30))
    left, top, w, h = images.rrc_params(img.width, img.height, rng, scale)
    return images.resize_crop(images._pixels(img), (left, top, left + w, top + h), size, False)


def captions(batch):
    """The captions of a batch's tokens, spaces removed (decoding puts a space after every digit)."""
    tok = data.get_tokenizer()
    return [''.join(tok.decode(t).split()) for t in batch['text']]


# ---------------------------------------------------------------- CLIP baseline: crops only

def test_clip_batch_has_no_flip_and_no_colour_op(tmp_path):
    pairs = write_pairs(tmp_path)
    cfg = clip_config(train_root=str(tmp_path), train_meta=str(tmp_path / 'meta.jsonl'))
    d = cfg.data
    assert (d.augmentation, tuple(d.crop_scale), d.views) == ('standard_slip', (0.5, 1.0), 1)
    batch = next(iter(loader.build_train_loader(d, rank=0, world=1, start_step=0, max_iter=1)))
    items = list(data.IterationSampler(len(pairs), batch_size=d.batch_size, world_size=1, rank=0, max_iter=1,
                                       seed=d.seed))
    for j, ((index, position), caption) in enumerate(zip(items, captions(batch))):
        assert caption == f'picture{index}'
        want = unflipped(pairs[caption], seeds.seeded_rng(d.seed, position), size=d.image_size, scale=(0.5, 1.0))
        assert not torch.equal(want, want.flip(-1))
        assert torch.equal(batch['images'][j, 0], want), j
    views = trainstep.device_views(batch, cfg=cfg, step=0, rank=0, world=1, device=CPU)
    assert 'jpeg' not in batch   # host views: nothing left undecoded
    assert torch.equal(views, images.normalize_images(batch['images'].flatten(0, 1)).view(views.shape))
    cfg.data.augmentation = 'moco_v2'   # the DeCLIP pipeline does change colours
    jittered = trainstep.device_views(batch, cfg=cfg, step=0, rank=0, world=1, device=CPU)
    assert not torch.equal(jittered, views)


def test_clip_webdataset_batch_has_no_flip(tmp_path):
    pairs = {f'picture{i}': image_bytes(asymmetric(i), 'JPEG') for i in range(8)}
    write_tar(tmp_path / 'a.tar', [m for i, (c, raw) in enumerate(pairs.items())
                                   for m in ((f'{i:03d}.jpg', raw), (f'{i:03d}.txt', c.encode()))])
    cfg = clip_config(format='wds', shards=str(tmp_path / 'a.tar'), batch_size=4)
    batch = next(iter(loader.build_train_loader(cfg.data, rank=0, world=1, start_step=0, max_iter=1)))
    for j, caption in enumerate(captions(batch)):  # rank 0, worker 0: stream positions 0..3
        rng = seeds.seeded_rng(cfg.data.seed, 'wds', 0, 0, j)
        assert torch.equal(batch['images'][j, 0], unflipped(pairs[caption], rng, size=64, scale=(0.5, 1.0)))


def test_clip_device_decode_has_no_flip(tmp_path):
    pairs = write_pairs(tmp_path, fmt='JPEG')
    cfg = clip_config(train_root=str(tmp_path), train_meta=str(tmp_path / 'meta.jsonl'), decode='device')
    batch = next(iter(loader.build_train_loader(cfg.data, rank=0, world=1, start_step=0, max_iter=1)))
    assert batch['jpeg_sizes'].gt(0).all() and not batch['flips'].any()
    views, undecodable = jpeg.decode_views(
        batch, size=64, device=CPU, decode=lambda blobs: [jpeg._pillow_decode(b, CPU) for b in blobs])
    items = data.IterationSampler(len(pairs), batch_size=6, world_size=1, rank=0, max_iter=1, seed=cfg.data.seed)
    for j, ((_, position), caption) in enumerate(zip(items, captions(batch))):
        want = unflipped(pairs[caption], seeds.seeded_rng(cfg.data.seed, position), size=64, scale=(0.5, 1.0))
        assert torch.equal(views[j, 0], want), j
    assert undecodable == 0


def test_moco_v2_keeps_its_random_stream_and_flips():
    """DeCLIP's crops draw boxes then flips from the sample's RNG exactly as before the CLIP
    switch existed (recorded losses depend on it); without flips the boxes are the same."""
    for seed in range(20):
        rng, same, plain = random.Random(seed), random.Random(seed), random.Random(seed)
        boxes, flips = images.view_boxes(500, 375, rng, views=2)
        assert boxes == [images.rrc_params(500, 375, same) for _ in range(2)]
        assert flips == [same.random() < 0.5 for _ in range(2)] and rng.random() == same.random()
        assert images.view_boxes(500, 375, plain, views=2, flip=False) == (boxes, [False, False])
    assert data.SampleBuilder(data_config()).flip is True


def test_unknown_augmentation_is_refused_naming_the_key(tmp_path):
    write_pairs(tmp_path, n=2)
    cfg = clip_config(train_root=str(tmp_path), train_meta=str(tmp_path / 'meta.jsonl'), val_meta='')
    checks.check_data(cfg.data)
    cfg.data.augmentation = 'simclr'
    for check in (checks.check_data, data.SampleBuilder):
        with pytest.raises(ValueError, match=r"config\.data\.augmentation: one of moco_v2, standard_slip, got 'simclr'"):
            check(cfg.data)


def test_former_augmentation_name_is_the_same_transform_with_a_warning(tmp_path):
    """'standard_clip' (this project's former name for the reference's STANDARD_SLIP) still means crops
    only, with a warning naming the new name; a resumed run saved under it is not a config change."""
    write_pairs(tmp_path, n=2)
    cfg = clip_config(train_root=str(tmp_path), train_meta=str(tmp_path / 'meta.jsonl'), val_meta='')
    cfg.data.augmentation = 'standard_clip'
    with pytest.warns(UserWarning, match="now called 'standard_slip'"):
        checks.check_data(cfg.data)
    assert cfg.data.augmentation == 'standard_slip'
    with pytest.warns(UserWarning):
        assert images.moco_views('standard_clip') is False
    assert images.moco_views('moco_v2') is True
    saved = cfg.to_dict()
    saved['data']['augmentation'] = 'standard_clip'
    checkpoints.check_resumed_config(saved, cfg, 'last.pt', allow_change=False)   # no refusal
    saved['data']['augmentation'] = 'moco_v2'
    with pytest.raises(ValueError, match="data.augmentation: 'moco_v2' -> 'standard_slip'"):
        checkpoints.check_resumed_config(saved, cfg, 'last.pt', allow_change=False)


def test_batchnorm_per_config_as_the_reference():
    """DeCLIP-R50 synchronises the image tower's BatchNorm; CLIP-R50 keeps it per device
    (the reference's CLIP-R50 config: use_sync_bn False); ViTs have none to synchronise."""
    from configs import clip_r50, r50, vitb32
    assert r50.get_config().model.sync_bn is True
    assert clip_r50.get_config().model.sync_bn is False
    assert clip_r50.get_config('smoke').model.sync_bn is False
    assert vitb32.get_config().model.sync_bn is False and clip_vitb32.get_config().model.sync_bn is False

# ---------------------------------------------------------------- webdataset: replacement, shuffle buffer

def write_stream_shards(folder, counts, bad=()):
    """Shards of samples with unique captions 'caption <key>'; keys in `bad` lose their caption
    (missing .txt) or get a broken image ('<key>!')."""
    for s, n in enumerate(counts):
        members = []
        for i in range(n):
            key = f'{s:02d}{i:03d}'
            buf = io.BytesIO()
            write_jpeg(buf, size=(40, 40), seed=s * 100 + i)
            raw = buf.getvalue()[:200] if f'{key}!' in bad else buf.getvalue()
            members.append((f'{key}.jpg', raw))
            if key not in bad:
                members.append((f'{key}.txt', f'caption {key}'.encode()))
        write_tar(folder / f'shard-{s:02d}.tar', members)


def wds_batches(cfg, steps, start_step=0):
    batches = loader.build_train_loader(cfg, rank=0, world=1, start_step=start_step, max_iter=start_step + steps)
    return [b for _, b in zip(range(steps), batches)]


@pytest.mark.parametrize('shuffle_buffer', [1, 2_000])
def test_bad_webdataset_samples_are_replaced_without_duplicates_and_resume_alike(tmp_path, shuffle_buffer):
    bad = {'00001', '00002!', '00005', '01000!', '01001', '01003'}
    write_stream_shards(tmp_path, [8, 8], bad)
    cfg = data_config(format='wds', shards=str(tmp_path / '*.tar'), eda=False, mask=False, batch_size=4,
                      bad_window=1000, workers=2, shuffle_buffer=shuffle_buffer)
    full = wds_batches(cfg, 8)
    assert sum(int(b['bad'].sum()) for b in full) >= len(bad)
    for b in full:
        names = captions(b)
        assert len(set(names)) == len(names), names
        assert all(name.startswith('caption') for name in names)
    resumed = wds_batches(cfg, 3, start_step=5)
    for a, b in zip(full[5:], resumed):
        for key in ('images', 'text', 'bad'):
            assert torch.equal(a[key], b[key]), key


def test_shuffle_buffer_mixes_a_pass_and_resumes_alike(tmp_path):
    write_stream_shards(tmp_path, [24])
    cfg = data_config(format='wds', shards=str(tmp_path / '*.tar'), eda=False, mask=False, batch_size=4,
                      shuffle_buffer=12)
    full = wds_batches(cfg, 12)  # two passes of 24
    keys = [[int(c[len('caption'):]) for c in captions(b)] for b in full]
    for p in range(2):   # every sample once per pass, not in file order
        flat = sum(keys[6 * p:6 * p + 6], [])
        assert sorted(flat) == list(range(24)) and flat != list(range(24))
    assert any(max(k) - min(k) > 4 for k in keys[:3])  # batches are not runs of consecutive samples
    assert keys[:6] != keys[6:]   # a new order each pass
    for a, b in zip(full[7:], wds_batches(cfg, 5, start_step=7)):
        assert torch.equal(a['images'], b['images']) and torch.equal(a['text'], b['text'])
    cfg.shuffle_buffer = 1   # stream order
    assert [[int(c[len('caption'):]) for c in captions(b)] for b in wds_batches(cfg, 6)] == \
        [list(range(i, i + 4)) for i in range(0, 24, 4)]


def test_a_worker_without_samples_is_an_error_not_a_hang(tmp_path):
    write_stream_shards(tmp_path, [2])
    stream = shards.ShardStream(data_config(format='wds', shards=str(tmp_path / '*.tar')), rank=0, world=1, start_step=0,
                                make_builder=data.SampleBuilder)
    assert len(list(zip(range(4), stream.samples(1, 2)))) == 4
    with pytest.raises(guard.DataError, match='loader worker 2 of 3'):
        next(stream.samples(2, 3))


# ---------------------------------------------------------------- brace patterns

@pytest.mark.parametrize('pattern, names', [
    ('/d/{00000..00003}.tar', ['/d/00000.tar', '/d/00001.tar', '/d/00002.tar', '/d/00003.tar']),
    ('/d/{8..11}.tar', ['/d/8.tar', '/d/9.tar', '/d/10.tar', '/d/11.tar']),
    ('/d/{08..10}.tar', ['/d/08.tar', '/d/09.tar', '/d/10.tar']),
    ('{a,b}-{0..4..2}', ['a-0', 'a-2', 'a-4', 'b-0', 'b-2', 'b-4']),
    ('{3..1}{x,}', ['3x', '3', '2x', '2', '1x', '1']),
    ('/d/{x}/{}.tar', ['/d/{x}/{}.tar']),
    ('/d/*.tar', ['/d/*.tar']),
])
def test_brace_expansion(pattern, names):
    assert text.expand_braces(pattern) == names


def test_too_many_names_is_an_error():
    with pytest.raises(ValueError, match='more than 1,000,000 names'):
        text.expand_braces('{0..9999999}.tar')
    with pytest.raises(ValueError, match='more than 1,000,000 names'):
        text.expand_braces('{0..999}{0..999}{0..9}')


def test_shard_patterns_with_braces_lists_and_globs(tmp_path):
    buf = io.BytesIO()
    write_jpeg(buf, size=(40, 40))
    stems = ['00000', '00001', '00002', '00003x', 'a', 'b', 'c', 'extra-1']
    for name in stems:
        write_tar(tmp_path / f'{name}.tar', [('k.jpg', buf.getvalue()), ('k.txt', name.encode())])
    spec = f'{tmp_path}/{{00000..00002}}.tar,{tmp_path}/{{a,b}}.tar,{tmp_path}/extra-*.tar'
    names = [p.split('/')[-1] for p in shards.shard_paths(spec)]
    assert names == ['00000.tar', '00001.tar', '00002.tar', 'a.tar', 'b.tar', 'extra-1.tar']
    cfg = data_config(format='wds', shards=spec, eda=False, mask=False, batch_size=6)
    checks.check_data(cfg)
    assert sorted(captions(wds_batches(cfg, 1)[0])) == ['00000', '00001', '00002', 'a', 'b', 'extra-1']
    cfg.shards = f'{tmp_path}/{{00000..00004}}.tar'
    with pytest.raises(ValueError, match=r'config\.data\.shards: 2 shard\(s\) .* do not exist: .*00003\.tar, .*00004\.tar'):
        checks.check_data(cfg)
