"""Data pipeline: formats, sampler, crops, device colour ops against PIL, EDA, loader."""
import io
import json
import math
import pickle
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageFilter

import data
import guard
import evaluate
import images
import jpeg
import loader
import text
from helpers import data_config, run_distributed, write_jpeg
from tools import bench_data


# ---------------------------------------------------------------- formats

def test_index_lines_offsets(tmp_path):
    path = tmp_path / 'm.jsonl'
    lines = [b'{"a": 1}', b'', b'{"b": 2}\r', b'{"c": 3}']
    path.write_bytes(b'\n'.join(lines))  # no trailing newline, an empty line, a CRLF line
    offsets = data.index_lines(path, chunk=5)  # chunk smaller than a line
    raw = path.read_bytes()
    got = [raw[o:].split(b'\n')[0] for o in offsets]
    assert got == [b'{"a": 1}', b'{"b": 2}\r', b'{"c": 3}']


def make_corpus(tmp_path, n=12):
    root = tmp_path / 'imgs'
    root.mkdir()
    recs = []
    for i in range(n):
        write_jpeg(root / f'{i}.jpg', seed=i)
        recs.append({'filename': f'{i}.jpg', 'caption': [f'a red square number {i}', 'ignored'], 'tag': 'x'})
    (tmp_path / 'meta.jsonl').write_text('\n'.join(json.dumps(r) for r in recs) + '\n')
    return root, recs


def test_jsonl_round_trip_and_first_caption(tmp_path):
    root, recs = make_corpus(tmp_path)
    ds = loader.train_dataset(data_config(train_root=str(root), train_meta=str(tmp_path / 'meta.jsonl'), eda=False))
    assert len(ds) == len(recs)
    for i in (0, 5, 11):
        s = ds[(i, 100 + i)]
        assert s['images'].shape == (2, 3, 32, 32) and s['images'].dtype == torch.uint8
        assert torch.equal(s['text'], data.tokenize([f'a red square number {i}'])[0])
        assert s['bad'].sum() == 0
    # the same position gives the same sample (resumable), another position other crops
    assert torch.equal(ds[(3, 7)]['images'], ds[(3, 7)]['images'])
    assert not torch.equal(ds[(3, 7)]['images'], ds[(3, 8)]['images'])


def test_the_core_dataset_alone_builds_what_the_guarded_one_builds(tmp_path):
    """data.PairDataset reads plainly and assumes well-formed input; behind the guard
    (loader.train_dataset) the same (index, position) gives the same tensors, plus the bad counts.
    A malformed line is the core's RecordError, not a replaced sample; the guarded set pickles (spawned
    loader workers). Break it catches: the guard drawing from another seeded stream than the core,
    the core hiding a bad line, a reader that cannot be pickled."""
    root, recs = make_corpus(tmp_path)
    cfg = data_config(train_root=str(root), train_meta=str(tmp_path / 'meta.jsonl'))
    core, guarded = data.PairDataset(cfg), loader.train_dataset(cfg)
    for item in ((0, 3), (7, 40), (11, 5)):
        plain, kept = core[item], guarded[item]
        assert set(kept) - set(plain) == {'bad'} and kept['bad'].sum() == 0
        for key in plain:
            assert torch.equal(torch.as_tensor(plain[key]), torch.as_tensor(kept[key])), (item, key)
    copy = pickle.loads(pickle.dumps(guarded))   # loader workers started by spawn get a copy
    assert torch.equal(copy[(7, 40)]['images'], guarded[(7, 40)]['images'])
    assert set(data.RecordError.KINDS) <= set(guard.BAD_KINDS)   # the core's kinds are counted
    (tmp_path / 'meta.jsonl').write_text(json.dumps(recs[0]) + '\n{"filename": \n')
    core, guarded = data.PairDataset(cfg), loader.train_dataset(cfg)
    with pytest.raises(data.RecordError, match='bad_json'):
        core[(1, 0)]
    assert guarded[(1, 0)]['bad'][guard.BAD_KINDS.index('bad_json')] >= 1


def test_several_sources_and_join_path(tmp_path):
    for k in range(2):
        d = tmp_path / f's{k}'
        d.mkdir()
        (d / 'm.jsonl').write_text(''.join(json.dumps({'filename': f'/f{k}_{i}', 'caption': 'c'}) + '\n' for i in range(3 + k)))
    meta = data.JsonlMeta([str(tmp_path / 's0'), 's3:'], [str(tmp_path / 's0/m.jsonl'), str(tmp_path / 's1/m.jsonl')])
    assert len(meta) == 7
    root, rec = meta.record(4)
    assert rec['filename'] == '/f1_1' and data.join_path(root, rec['filename']) == 's3:/f1_1'
    root, rec = meta.record(2)
    assert data.join_path(root, rec['filename']) == str(tmp_path / 's0' / 'f0_2')


def test_eval_dataset_layout_and_sharding(tmp_path):
    recs = []
    for i in range(5):
        write_jpeg(tmp_path / f'ILSVRC2012_val_{i:08d}.JPEG', size=(300, 260), seed=i)
        recs.append({'filename': f'ILSVRC2012_val_{i:08d}.JPEG', 'label': 4 - i % 3, 'label_name': f'c{4 - i % 3}'})
    (tmp_path / 'val.jsonl').write_text('\n'.join(map(json.dumps, recs)))
    shards = [evaluate.EvalDataset(str(tmp_path), str(tmp_path / 'val.jsonl'), rank=r, world=2) for r in range(2)]
    assert sorted(i for ds in shards for i in ds.indices) == list(range(5))
    img, label, index, bad = shards[1][0]
    assert img.shape == (3, 224, 224) and label == recs[1]['label'] and index == 1 and bad == -1
    assert shards[0].classes() == [(2, 'c2'), (3, 'c3'), (4, 'c4')]


def test_eval_view_is_resize_then_centre_crop():
    arr = np.random.default_rng(0).integers(0, 256, (300, 400, 3)).astype(np.uint8)
    img = Image.fromarray(arr)
    want = img.resize((341, 256), Image.BILINEAR).crop((58, 16, 282, 240))
    assert torch.equal(images.eval_view(img), torch.from_numpy(np.asarray(want).copy()).permute(2, 0, 1))


def write_shards(tmp_path, counts):
    keys = []
    for s, n in enumerate(counts):
        with tarfile.open(tmp_path / f'shard-{s:03d}.tar', 'w') as tar:
            for i in range(n):
                key = f'{s:03d}{i:04d}'
                keys.append(key)
                buf = io.BytesIO()
                write_jpeg(buf, size=(40, 40), seed=len(keys))
                for ext, payload in (('jpg', buf.getvalue()), ('txt', f'caption {key}'.encode()),
                                     ('json', b'{}')):
                    info = tarfile.TarInfo(f'{key}.{ext}')
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return keys


def _wds_worker(rank, world, cfg_dict, steps, path):
    import ml_collections
    cfg = ml_collections.ConfigDict(cfg_dict)
    batches = loader.build_train_loader(cfg, rank=rank, world=world, start_step=0, max_iter=steps)
    tok = data.get_tokenizer()
    seen = []
    for step, batch in zip(range(steps), batches):
        seen += [''.join(tok.decode(t).split()[1:]) for t in batch['text']]
    torch.save(seen, f'{path}.{rank}')


@pytest.mark.parametrize('counts', [[6, 6, 6, 6], [3] * 8, [24]])
def test_webdataset_two_ranks_two_workers_cover_a_pass_once(tmp_path, counts):
    keys = write_shards(tmp_path, counts)
    cfg = data_config(format='wds', shards=str(tmp_path / '*.tar'), workers=2, eda=False, mask=False,
                      batch_size=3, prefetch=2)
    # 2 ranks x 2 workers x 2 batches x 3 = 24 samples = exactly one pass, split by shards
    # (4 or 8 shards for 4 global workers) or by samples (1 shard)
    path = str(tmp_path / 'seen')
    run_distributed(_wds_worker, 2, cfg.to_dict(), 4, path)
    seen = torch.load(f'{path}.0') + torch.load(f'{path}.1')
    assert sorted(seen) == sorted(keys)


def test_webdataset_resume_continues_the_stream(tmp_path):
    write_shards(tmp_path, [6, 6, 6])
    cfg = data_config(format='wds', shards=str(tmp_path / '*.tar'), workers=2, eda=False, mask=False, batch_size=2)
    full = [b['images'] for _, b in zip(range(6), loader.build_train_loader(cfg, rank=0, world=1, start_step=0, max_iter=6))]
    resumed = [b['images'] for _, b in zip(range(3), loader.build_train_loader(cfg, rank=0, world=1, start_step=3, max_iter=6))]
    for a, b in zip(full[3:], resumed):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- sampler

def test_sampler_disjoint_ranks_full_passes_and_resume():
    size, B, W, T = 10, 3, 2, 10  # 60 draws = 6 passes
    samplers = [data.IterationSampler(size, batch_size=B, world_size=W, rank=r, max_iter=T, seed=1) for r in range(W)]
    per_rank = [list(s) for s in samplers]
    positions = sorted(p for items in per_rank for _, p in items)
    assert positions == list(range(size * B * W * T // size // 1))[:60]
    assert not set(per_rank[0]) & set(per_rank[1])
    stream = {p: i for items in per_rank for i, p in items}
    for p in range(6):
        assert sorted(stream[q] for q in range(p * size, (p + 1) * size)) == list(range(size))
    assert [stream[q] for q in range(10)] != [stream[q] for q in range(10, 20)]  # a new order per pass
    resumed = data.IterationSampler(size, batch_size=B, world_size=W, rank=1, max_iter=T, seed=1, start_step=4)
    assert list(resumed) == per_rank[1][4 * B:]
    assert len(resumed) == (T - 4) * B


# ---------------------------------------------------------------- crops

def test_random_resized_crop_distribution():
    rng = random.Random(0)
    W, H = 1000, 1000
    areas, logs = [], []
    for _ in range(20000):
        left, top, w, h = images.rrc_params(W, H, rng, scale=(0.2, 0.5))
        assert 0 <= left and left + w <= W and 0 <= top and top + h <= H
        areas.append(w * h / (W * H))
        logs.append(math.log(w / h))
    areas, logs = np.array(areas), np.array(logs)
    # no try can fail at scale <= 0.5, so area ~ U(0.2, 0.5) and log-aspect ~ U(log 3/4, log 4/3)
    assert areas.min() > 0.195 and areas.max() < 0.505
    assert abs(areas.mean() - 0.35) < 0.005 and abs(np.quantile(areas, 0.25) - 0.275) < 0.01
    assert abs(logs.mean()) < 0.01 and abs(logs.max() - math.log(4 / 3)) < 0.01
    assert abs(np.quantile(logs, 0.75) - math.log(4 / 3) / 2) < 0.01
    # full scale range on a 500x375 photo: always inside the declared ranges
    for _ in range(2000):
        _, _, w, h = images.rrc_params(500, 375, rng)
        assert 0.2 * 187500 * 0.97 <= w * h <= 187500 and 0.74 <= w / h <= 1.35
    # an extreme aspect never fits: centre fallback clipped to the ratio range
    assert images.rrc_params(1000, 10, rng) == ((1000 - 13) // 2, 0, 13, 10)


@pytest.mark.parametrize('fmt', ['PNG', 'JPEG'])
def test_train_views_are_crop_resize_flip(fmt):
    """torchvision's RandomResizedCrop + flip on PIL images, computed with torch's uint8 kernel:
    equal to Pillow's crop + BILINEAR resize up to rounding: 1 level, on a few per cent of the
    values when crops are upscaled as here (~0.1 % for 500x375 photos at 224 px)."""
    rng = np.random.default_rng(1)
    smooth = Image.fromarray(rng.integers(0, 256, (8, 10, 3)).astype(np.uint8)).resize((200, 150), Image.BICUBIC)
    arr = (np.asarray(smooth).astype(int) + rng.integers(-20, 21, (150, 200, 3))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, quality=95)
    decoded = images.to_rgb(guard.open_image(buf.getvalue(), 1 << 30))
    diffs = []
    for seed in range(8):
        views = images.train_views(guard.open_image(buf.getvalue(), 1 << 30), size=96, rng=random.Random(seed))  # < 2x: no JPEG draft
        rng = random.Random(seed)
        boxes = [images.rrc_params(200, 150, rng) for _ in range(2)]
        flips = [rng.random() < 0.5 for _ in range(2)]
        for v in range(2):
            left, top, w, h = boxes[v]
            want = decoded.crop((left, top, left + w, top + h)).resize((96, 96), Image.BILINEAR)
            if flips[v]:
                want = want.transpose(Image.FLIP_LEFT_RIGHT)
            diffs.append((views[v].int() - images._to_chw(want).int()).abs())
    diffs = torch.stack(diffs)
    assert diffs.max() <= 1
    assert (diffs > 0).float().mean() < 0.05


def test_float_resize_matches_uint8_kernel_and_pillow():
    """The accelerator form of resize_crop (float, rounded) against the CPU uint8 kernel and Pillow."""
    arr = np.random.default_rng(3).integers(0, 256, (60, 80, 3)).astype(np.uint8)
    pixels = images._pixels(Image.fromarray(arr))
    for box, size in [((5, 7, 70, 52), 32), ((0, 0, 80, 60), 48), ((10, 10, 40, 30), 64)]:
        want = images._to_chw(Image.fromarray(arr).crop(box).resize((size, size), Image.BILINEAR)).int()
        crop = pixels[:, :, box[1]:box[3], box[0]:box[2]]
        for got in (images._resize_uint8(crop, size)[0], images._resize_float(crop, size)[0]):
            assert (got.int() - want).abs().max() <= 1


# ---------------------------------------------------------------- device JPEG decode (optional path)

def pillow_decode(blobs):
    """Stands in for nvjpeg: a list of JPEG byte tensors -> list of uint8 [3, H, W]."""
    return [jpeg._pillow_decode(b, torch.device('cpu')) for b in blobs]


def write_mixed_corpus(folder):
    """JPEGs (RGB, grayscale) for the device, and files that stay on the host: PNG, CMYK JPEG,
    a JPEG with bytes after its end marker. Small enough that no JPEG draft reduction applies."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(10):
        arr = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
        img = Image.fromarray(arr).resize((90, 70), Image.BICUBIC)
        name, kind = f'{i}.jpg', i % 5
        if kind == 1:
            img.convert('L').save(folder / name, format='JPEG')
        elif kind == 2:
            name = f'{i}.png'
            img.save(folder / name, format='PNG')
        elif kind == 3:
            img.convert('CMYK').save(folder / name, format='JPEG')
        else:
            img.save(folder / name, format='JPEG')
            if kind == 4:
                (folder / name).write_bytes((folder / name).read_bytes() + b'trailing')
        lines.append(json.dumps({'filename': name, 'caption': f'picture number {i}'}))
    (folder / 'meta.jsonl').write_text('\n'.join(lines))


def test_device_decode_batch_equals_host_batch(tmp_path):
    write_mixed_corpus(tmp_path)
    batches = {}
    for mode in ('host', 'device'):
        cfg = data_config(train_root=str(tmp_path), train_meta=str(tmp_path / 'meta.jsonl'), batch_size=10,
                          image_size=40, decode=mode)
        batches[mode] = next(iter(loader.build_train_loader(cfg, rank=0, world=1, start_step=0, max_iter=1)))
    host, dev = batches['host'], batches['device']
    on_device = (dev['jpeg_sizes'] > 0).tolist()
    assert sum(on_device) == 4 and len(dev['host']) == 6 and dev['images'].shape[0] == 6
    views, undecodable = jpeg.decode_views(dev, size=40, device=torch.device('cpu'), decode=pillow_decode)
    assert undecodable == 0
    assert torch.equal(views, host['images'])  # same crops, same pixels, same kernel
    for key in ('text', 'text_eda', 'mlm_index', 'mlm_targets'):
        assert torch.equal(dev[key], host[key])


def test_device_decode_retries_then_falls_back_then_replaces():
    """A failing batched decode is retried per image; an image the device refuses is decoded by
    Pillow; one nothing decodes takes the first good sample's views and is counted."""
    rng = np.random.default_rng(1)
    blobs = []
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (50, 60, 3)).astype(np.uint8)).save(buf, format='JPEG')
        blobs.append(buf.getvalue())
    blobs.append(b'\xff\xd8 not a jpeg \xff\xd9')
    samples = [jpeg.jpeg_sample(raw, 60, 50, random.Random(i)) for i, raw in enumerate(blobs)]
    batch = jpeg.collate_jpeg(samples)
    refused = {blobs[1], blobs[3]}
    calls = []

    def flaky(batch_blobs):
        calls.append(len(batch_blobs))
        if any(bytes(b.numpy()) in refused for b in batch_blobs):
            raise RuntimeError('nvjpeg: unsupported')
        return pillow_decode(batch_blobs)
    views, undecodable = jpeg.decode_views(batch, size=24, device=torch.device('cpu'), decode=flaky)
    assert calls == [4, 1, 1, 1, 1] and undecodable == 1
    for i in range(3):
        pixels = images._pixels(images.to_rgb(guard.open_image(blobs[i], 1 << 30)))
        for v in range(2):
            want = images.resize_crop(pixels, batch['boxes'][i, v].tolist(), 24, bool(batch['flips'][i, v]))
            assert torch.equal(views[i, v], want)
    assert torch.equal(views[3], views[0])
    # what the step gets (jpeg.decoded): these views as 'images', the JPEG keys gone, the image
    # nothing decoded counted as truncated on top of the loader's counts
    batch['bad'] = torch.arange(len(guard.BAD_KINDS))
    jpeg.nvjpeg_decoder, real = (lambda device: flaky), jpeg.nvjpeg_decoder
    try:
        out = jpeg.decoded(batch, size=24, device=torch.device('cpu'))
    finally:
        jpeg.nvjpeg_decoder = real
    assert out.keys() == {'images', 'bad'} and torch.equal(out['images'], views)
    want_bad = torch.arange(len(guard.BAD_KINDS))
    want_bad[guard.BAD_KINDS.index('truncated')] += 1
    assert torch.equal(out['bad'], want_bad) and torch.equal(batch['bad'], torch.arange(len(guard.BAD_KINDS)))
    assert jpeg.decoded(out, size=24, device=torch.device('cpu')) is out     # host views pass as they are


# ---------------------------------------------------------------- device colour ops vs PIL

def _images(n=12, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        base = Image.fromarray(rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)).resize((40, 32), Image.BILINEAR)
        arr = np.asarray(base).astype(int) + rng.integers(-30, 31, (32, 40, 3))
        out.append(Image.fromarray(arr.clip(0, 255).astype(np.uint8)))
    return out


def _t(imgs):
    return torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in imgs]).float() / 255


PIL_OPS = {
    'brightness': (images.adjust_brightness, lambda im, f: ImageEnhance.Brightness(im).enhance(f), (0.6, 1.4)),
    'contrast': (images.adjust_contrast, lambda im, f: ImageEnhance.Contrast(im).enhance(f), (0.6, 1.4)),
    'saturation': (images.adjust_saturation, lambda im, f: ImageEnhance.Color(im).enhance(f), (0.6, 1.4)),
    'hue': (images.adjust_hue, bench_data.pil_hue, (-0.1, 0.1)),
    'blur': (images.gaussian_blur, lambda im, f: im.filter(ImageFilter.GaussianBlur(radius=f)), (0.1, 2.0)),
}


@pytest.mark.parametrize('name', list(PIL_OPS))
def test_device_op_matches_pil(name):
    ours, pil, (lo, hi) = PIL_OPS[name]
    imgs = _images()
    factors = torch.linspace(lo, hi, len(imgs))
    got = ours(_t(imgs), factors)
    want = _t([pil(im, float(f)) for im, f in zip(imgs, factors)])
    assert (got - want).abs().max() <= 2 / 255


def test_grayscale_matches_pil():
    imgs = _images(4)
    got = images.to_grayscale(_t(imgs))
    for k, im in enumerate(imgs):
        want = _t([im.convert('L').convert('RGB')])[0]
        assert (got[k] - want).abs().max() <= 1 / 255


def test_device_augment_is_the_per_sample_pipeline():
    """Batched op-by-op on subsets == each sample on its own: its jitter order and factors,
    grayscale, blur, drawn in device_augment's documented order from the same generator."""
    imgs = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (24, 3, 12, 12)).astype(np.uint8))
    got = images.device_augment(imgs, generator=torch.Generator().manual_seed(5), normalize=False)
    g, n = torch.Generator().manual_seed(5), len(imgs)

    def u(lo, hi):
        return torch.rand(n, generator=g) * (hi - lo) + lo
    jitter = torch.rand(n, generator=g) < 0.8
    factors = [u(0.6, 1.4), u(0.6, 1.4), u(0.6, 1.4), u(-0.1, 0.1)]
    order = torch.rand(n, 4, generator=g).argsort(dim=1)
    gray, blur, sigma = torch.rand(n, generator=g) < 0.2, torch.rand(n, generator=g) < 0.5, u(0.1, 2.0)
    ops = [images.adjust_brightness, images.adjust_contrast, images.adjust_saturation, images.adjust_hue]
    for i in range(n):
        x = imgs[i:i + 1].float() / 255
        for k in (order[i].tolist() if jitter[i] else []):
            x = ops[k](x, factors[k][i:i + 1])
        if gray[i]:
            x = images.to_grayscale(x)
        if blur[i]:
            x = images.gaussian_blur(x, sigma[i:i + 1])
        torch.testing.assert_close(got[i:i + 1], x, rtol=0, atol=1e-6)


def test_device_augment_statistics_and_determinism():
    imgs = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (400, 3, 8, 8)).astype(np.uint8))
    a = images.device_augment(imgs, generator=torch.Generator().manual_seed(0), normalize=False)
    b = images.device_augment(imgs, generator=torch.Generator().manual_seed(0), normalize=False)
    assert torch.equal(a, b)
    x = imgs.float() / 255
    unchanged = (a - x).abs().amax(dim=(1, 2, 3)) < 1e-6
    # untouched only with no jitter (0.2), no grayscale (0.8) and no blur (0.5): 8 %
    assert 0.04 < unchanged.float().mean() < 0.12
    gray = (a[:, 0] == a[:, 1]).all(dim=(1, 2)) & (a[:, 1] == a[:, 2]).all(dim=(1, 2))
    assert 0.15 < gray.float().mean() < 0.25
    n = images.device_augment(imgs[:2], generator=torch.Generator().manual_seed(0))
    raw = images.device_augment(imgs[:2], generator=torch.Generator().manual_seed(0), normalize=False)
    mean, std = torch.tensor(images.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(images.IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(n, (raw - mean) / std)


# ---------------------------------------------------------------- EDA

@pytest.fixture(scope='module')
def eda():
    return text.EDA(data.SYNONYMS_PATH)


def test_synonyms_follow_wordnet_morphology(eda):
    assert 'true cat' in eda.synonyms('cat') and 'true cat' in eda.synonyms('cats')
    assert 'cat' not in eda.synonyms('cat')
    assert 'run away' in eda.synonyms('running')       # via the verb rule -ing -> run
    assert 'mouse' in eda.synonyms('mice') or 'computer mouse' in eda.synonyms('mice')  # exception list
    assert all(set(s) <= set('abcdefghijklmnopqrstuvwxyz ') for s in eda.synonyms('New_York'.lower()))


def test_synonym_replacement_replaces_every_occurrence(eda):
    words = 'the cat saw the other cat'.split()
    out = eda.synonym_replacement(words, random.Random(3))
    changed = {w for w, o in zip(words, out) if w != o}
    assert len(changed) == 1
    word = changed.pop()
    new = {o for w, o in zip(words, out) if w == word}
    assert len(new) == 1 and new.pop() in eda.synonyms(word)
    assert eda.synonym_replacement(['the', 'of'], random.Random(0)) == ['the', 'of']  # stopwords only


def test_swap_and_deletion(eda):
    words = 'one two three four five'.split()
    out = eda.random_swap(words, random.Random(1))
    assert sorted(out) == sorted(words) and sum(a != b for a, b in zip(out, words)) == 2
    assert eda.random_swap(['solo'], random.Random(0)) == ['solo']
    kept = [len(eda.random_deletion(words * 20, random.Random(s))) for s in range(50)]
    assert abs(np.mean(kept) / 100 - 0.9) < 0.02
    assert eda.random_deletion(['only'], random.Random(0)) == ['only']          # a string, not a list
    rng = random.Random(0)
    rng.random = lambda: 0.0                                                  # every word deleted
    assert eda.random_deletion(['a', 'b'], rng) in (['a'], ['b'])
    with pytest.raises(ValueError):
        eda('   ', random.Random(0))


def test_missing_synonym_table_message(tmp_path):
    with pytest.raises(FileNotFoundError, match='eda_synonyms=False'):
        text.EDA(tmp_path / 'none.tsv.gz')
    assert text.EDA(tmp_path / 'none.tsv.gz', use_synonyms=False).ops[0].__name__ == 'random_swap'


# ---------------------------------------------------------------- loader

def test_loader_batch_contents(tmp_path):
    root, recs = make_corpus(tmp_path)
    cfg = data_config(train_root=str(root), train_meta=str(tmp_path / 'meta.jsonl'))
    batch = next(iter(loader.build_train_loader(cfg, rank=0, world=1, start_step=0, max_iter=3)))
    assert batch['images'].shape == (4, 2, 3, 32, 32) and batch['images'].dtype == torch.uint8
    assert batch['text'].shape == batch['text_eda'].shape == (4, 77)
    flat = batch['text'].flatten()
    assert batch['mlm_index'].numel() == batch['mlm_targets'].numel()
    assert (batch['mlm_targets'] != flat[batch['mlm_index']]).float().mean() >= 0.5  # mostly masked
    assert batch['bad'].shape == (len(guard.BAD_KINDS),) and batch['bad'].sum() == 0
