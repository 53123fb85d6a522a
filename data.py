"""Data: JSON Lines and webdataset formats, training samples with bad-input handling, the
iteration sampler, loaders and the evaluation dataset. Nothing here imports model code.

The data folder (vocabulary, synonym table, demo corpus) is `data/` beside this file, or
$DECLIP_DATA when set: the one rule every default path follows.
"""
import os
import random
from pathlib import Path

import torch

import images
import text
from images import BadSample

ROOT = Path(__file__).resolve().parent
DATA_DIR = Path(os.environ.get('DECLIP_DATA', ROOT / 'data'))
BPE_PATH = DATA_DIR / 'bpe_simple_vocab_16e6.txt.gz'
SYNONYMS_PATH = DATA_DIR / 'wordnet_synonyms.tsv.gz'
SEED_MIX = 1_000_003
BAD_KINDS = ('missing', 'empty_file', 'not_image', 'truncated', 'too_large', 'empty_caption',
             'bad_json', 'bad_encoding', 'bad_tar', 'other')


def seeded_rng(*parts):
    """A Python RNG seeded by the parts (sample-level choices: crops, flips, EDA, replacements)."""
    return random.Random(':'.join(map(str, parts)))


def generator(seed, index):
    """A CPU torch generator for stream `index` of a run seeded `seed`: the sampler's pass p, the
    MLM masks of the batch starting at stream position p, the device augmentation of step t and
    rank r (index t * world + r). Distinct indices give distinct streams within one use; the
    uses share the mixing rule, so their index ranges may overlap (they draw unrelated things)."""
    return torch.Generator().manual_seed(seed * SEED_MIX + index)


class Tokenizer(text.Tokenizer):
    """text.Tokenizer reading the data folder's vocabulary unless given another (kept here for
    scripts that use data.Tokenizer / data.tokenize)."""

    def __init__(self, bpe_path=BPE_PATH):
        super().__init__(bpe_path)


def get_tokenizer(bpe_path=BPE_PATH):
    return text.get_tokenizer(str(bpe_path))


def tokenize(texts, context_length=text.CONTEXT_LENGTH, bpe_path=BPE_PATH):
    """Tokenize with the default (or a given) vocabulary: LongTensor [B, context_length]."""
    return get_tokenizer(bpe_path)(texts, context_length)


# ----------------------------------------------------------------------------------------------
# Formats: JSON Lines meta (YFCC15M / ImageNet-val layout), webdataset tar shards
# ----------------------------------------------------------------------------------------------

def index_lines(path, chunk=1 << 24):
    """Byte offsets of the non-empty lines of a file as an int64 numpy array (a 15 M-line meta
    costs 120 MB, not 15 M parsed dicts)."""
    import numpy as np
    starts, pos, last_newline = [], 0, -1
    with open(path, 'rb') as f:
        while True:
            buf = f.read(chunk)
            if not buf:
                break
            nl = np.flatnonzero(np.frombuffer(buf, dtype=np.uint8) == 10) + pos
            ends = np.concatenate([[last_newline], nl])
            line_starts = ends[:-1] + 1
            starts.append(line_starts[nl > line_starts])
            if len(nl):
                last_newline = int(nl[-1])
            pos += len(buf)
    if pos > last_newline + 1:
        starts.append(np.array([last_newline + 1]))
    return np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, np.int64)


def join_path(root, filename):
    """The reference's joinpath: object-store prefixes ('s3:') concatenate, otherwise os.path.join
    with a leading '/' of filename stripped."""
    if not root:
        return filename
    if root.endswith(':'):
        return root + filename
    return os.path.join(root, filename.lstrip('/'))


class JsonlMeta:
    """Random access to the records of several (root, meta file) pairs by line offsets."""

    def __init__(self, roots, metas):
        import numpy as np
        if len(roots) != len(metas):
            raise ValueError(f'{len(roots)} roots for {len(metas)} meta files')
        self.sources = []
        for root, meta in zip(roots, metas):
            if not Path(meta).is_file():
                raise FileNotFoundError(f'meta file not found: {meta}')
            self.sources.append((root, meta, index_lines(meta)))
        self.cumulative = np.cumsum([len(s[2]) for s in self.sources])
        self.handles = {}

    def __len__(self):
        return int(self.cumulative[-1]) if len(self.cumulative) else 0

    def locate(self, i):
        import numpy as np
        src = int(np.searchsorted(self.cumulative, i, side='right'))
        local = i - (int(self.cumulative[src - 1]) if src else 0)
        return src, local

    def record(self, i):
        """(root, record dict, 'meta:line' for messages); malformed lines raise BadSample."""
        import json
        src, local = self.locate(i)
        root, meta, offsets = self.sources[src]
        handle = self.handles.get(src)
        if handle is None or handle[0] != os.getpid():  # one handle per worker process
            handle = self.handles[src] = (os.getpid(), open(meta, 'rb'))
        f = handle[1]
        f.seek(int(offsets[local]))
        raw = f.readline()
        where = f'{meta}:{local + 1}'
        try:
            line = raw.decode('utf-8')
        except UnicodeDecodeError as e:
            raise BadSample('bad_encoding', where) from e
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise BadSample('bad_json', where) from e
        if not isinstance(rec, dict) or 'filename' not in rec:
            raise BadSample('bad_json', f'{where}: no "filename"')
        return root, rec, where

    def __getstate__(self):
        return {**self.__dict__, 'handles': {}}


def first_caption(caption):
    """The reference always uses the first caption of a list."""
    if isinstance(caption, (list, tuple)):
        caption = caption[0] if caption else ''
    if not isinstance(caption, str) or not caption.strip():
        raise BadSample('empty_caption', repr(caption)[:60])
    return caption


def iter_tar(path):
    """(key, {ext: bytes}) groups of consecutive members of a webdataset shard, with the standard
    library; a broken member or header ends the shard with a BadSample group."""
    import tarfile
    key, group = None, {}
    try:
        with tarfile.open(path, 'r|*') as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                base, _, ext = os.path.basename(name).partition('.')
                k = os.path.join(os.path.dirname(name), base)
                if k != key and key is not None:
                    yield key, group
                    group = {}
                key = k
                group[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        if key is not None:
            yield key, group
        yield f'{path}:broken', {'__error__': str(e).encode()}
        return
    if key is not None:
        yield key, group


# ----------------------------------------------------------------------------------------------
# Training samples, bad-input handling, sampler, loader
# ----------------------------------------------------------------------------------------------

class DataError(RuntimeError):
    """Too many bad samples: the corpus (or its paths) is wrong, not just a few files."""


class FailureMonitor:
    """Failure rate over the last `window` attempts of this process; above `max_rate` it raises
    a DataError naming a few examples."""

    def __init__(self, window, max_rate):
        import collections
        self.window, self.max_rate = window, max_rate
        self.recent = collections.deque(maxlen=window)
        self.examples = collections.deque(maxlen=5)

    def record(self, failure=None):
        self.recent.append(failure is not None)
        if failure is not None:
            self.examples.append(failure)
            rate = sum(self.recent) / len(self.recent)
            if len(self.recent) == self.window and rate > self.max_rate:
                raise DataError(
                    f'{rate:.0%} of the last {self.window} samples could not be built (limit '
                    f'{self.max_rate:.0%}, data.max_bad_rate); examples:\n  ' + '\n  '.join(self.examples))


class SampleBuilder:
    """Turns a caption and an image source into the tensors of one training sample."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.tokenizer = get_tokenizer(cfg.bpe_path)
        self.eda = text.EDA(cfg.synonyms_path, use_synonyms=cfg.eda_synonyms) if cfg.eda else None
        self.monitor = FailureMonitor(cfg.bad_window, cfg.max_bad_rate)

    def __call__(self, caption, image, rng):
        caption = first_caption(caption)
        raw = images.read_bytes(image)
        img = images.open_image(raw, self.cfg.max_pixels)
        views, scale = self.cfg.views, tuple(self.cfg.crop_scale)
        if self.cfg.decode == 'device' and images.device_decodable(raw, img):
            out = images.jpeg_sample(raw, img.width, img.height, rng, views=views, scale=scale)
        else:
            out = {'images': images.train_views(img, size=self.cfg.image_size, rng=rng, views=views, scale=scale)}
        length = self.cfg.context_length
        out['text'] = self.tokenizer(caption, length)[0]
        if self.eda is not None:
            out['text_eda'] = self.tokenizer(self.eda(caption, rng), length)[0]
        return out

    def attempt(self, build, where):
        """Run build(); a failure returns its kind (and is recorded), success returns None."""
        try:
            sample = build()
        except DataError:
            raise
        except BadSample as e:
            kind, detail = e.kind, str(e)
        except Exception as e:  # a sample must never stop training; the monitor catches patterns
            kind, detail = 'other', f'{type(e).__name__}: {e}'
        else:
            self.monitor.record(None)
            return sample, None
        self.monitor.record(f'{where}: {detail}'[:300])
        return None, kind


def bad_counts(kinds):
    counts = torch.zeros(len(BAD_KINDS), dtype=torch.long)
    for kind in kinds:
        counts[BAD_KINDS.index(kind)] += 1
    return counts


class PairDataset(torch.utils.data.Dataset):
    """Image-caption pairs of JSON Lines metas (YFCC15M layout). Items are (index, position)
    pairs from IterationSampler; the position seeds every random choice of the sample, so a
    resumed run sees identical samples. A failing sample is replaced by a deterministic other one."""

    def __init__(self, cfg):
        roots, metas = split_list(cfg.train_root), split_list(cfg.train_meta)
        self.meta = JsonlMeta(roots, metas)
        if len(self.meta) == 0:
            raise ValueError(f'no samples in {metas}')
        self.builder = SampleBuilder(cfg)
        self.seed = cfg.seed

    def __len__(self):
        return len(self.meta)

    def __getitem__(self, item):
        index, position = item
        rng = seeded_rng(self.seed, position)
        failures = []
        for _ in range(100):
            where = f'sample {index}'

            def build():
                nonlocal where
                root, rec, where = self.meta.record(index)
                return self.builder(rec.get('caption'), join_path(root, str(rec['filename'])), rng)
            sample, kind = self.builder.attempt(build, where)
            if sample is not None:
                return {**sample, 'position': position, 'bad': bad_counts(failures)}
            failures.append(kind)
            index = rng.randrange(len(self.meta))
        raise DataError(f'100 consecutive bad samples around position {position}')


class ShardStream(torch.utils.data.IterableDataset):
    """webdataset tar shards (KEY.jpg + KEY.txt [+ KEY.json]) streamed with the standard library.

    Each pass visits the shards in an order derived from (seed, pass). Global worker g of G =
    world x workers takes shards g, g+G, ... (or, with fewer shards than G, every G-th sample), so
    a pass yields every sample exactly once. Each worker emits whole batches and the DataLoader
    takes them round-robin, so a restart at step k knows how many samples each worker had
    consumed and skips them by reading tar headers only. A bad sample is replaced by the worker's
    previous good one, re-augmented, which keeps positions one-to-one with samples."""

    def __init__(self, cfg, *, rank, world, start_step):
        import glob
        self.shards = sorted(p for pattern in split_list(cfg.shards) for p in glob.glob(pattern))
        if not self.shards:
            raise FileNotFoundError(f'no shards match data.shards={cfg.shards!r}')
        self.cfg, self.rank, self.world, self.start_step = cfg, rank, world, start_step
        self.builder = None

    def samples(self, worker, workers):
        """(pass, key, group) of this worker's share, forever."""
        g, total = self.rank * workers + worker, self.world * workers
        for p in range(1 << 62):
            order = torch.randperm(len(self.shards), generator=generator(self.cfg.seed, p)).tolist()
            if len(self.shards) >= total:
                for s in order[g::total]:
                    for key, group in iter_tar(self.shards[s]):
                        yield p, key, group
            else:
                i = 0
                for s in order:
                    for key, group in iter_tar(self.shards[s]):
                        if i % total == g:
                            yield p, key, group
                        i += 1

    def build(self, group, rng):
        if '__error__' in group:
            raise BadSample('bad_tar', group['__error__'].decode(errors='replace'))
        image = next((group[e] for e in ('jpg', 'jpeg', 'png', 'webp') if e in group), None)
        if image is None or 'txt' not in group:
            raise BadSample('bad_tar', f'members {sorted(group)}')
        try:
            caption = group['txt'].decode('utf-8')
        except UnicodeDecodeError as e:
            raise BadSample('bad_encoding', 'txt') from e
        return self.builder(caption, image, rng)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.builder is None:
            self.builder = SampleBuilder(self.cfg)
        # the loader asks worker 0 first, so after k steps worker w plays the role of the worker
        # that would have produced step k + w
        worker = (worker + self.start_step) % workers
        batch = self.cfg.batch_size
        skip = len(range(worker, self.start_step, workers)) * batch
        last_good, failures = None, []
        for position, (p, key, group) in enumerate(self.samples(worker, workers)):
            if position < skip:
                last_good = group
                continue
            rng = seeded_rng(self.cfg.seed, 'wds', self.rank, worker, position)
            sample, kind = self.builder.attempt(lambda: self.build(group, rng), key)
            if sample is None:
                failures.append(kind)
                if last_good is not None:
                    sample, _ = self.builder.attempt(lambda: self.build(last_good, rng), key)
                if sample is None:
                    continue
            else:
                last_good = group
            yield {**sample, 'position': position, 'bad': bad_counts(failures)}
            failures = []


class IterationSampler(torch.utils.data.Sampler):
    """The reference's iteration sampler without its tiled index array: the global stream is the
    concatenation of passes, pass p a permutation seeded by (seed, p); step t of rank r takes
    stream positions (t*W + r)*B ... +B-1. Yields (index, position); resumable at any step."""

    def __init__(self, size, *, batch_size, world_size, rank, max_iter, seed, start_step=0):
        self.size, self.batch, self.world, self.rank = size, batch_size, world_size, rank
        self.max_iter, self.seed, self.start_step = max_iter, seed, start_step
        self._pass, self._perm = None, None

    def index(self, position):
        p, k = divmod(position, self.size)
        if p != self._pass:
            g = generator(self.seed, p)
            self._pass, self._perm = p, torch.randperm(self.size, generator=g)
        return int(self._perm[k])

    def __iter__(self):
        for t in range(self.start_step, self.max_iter):
            base = (t * self.world + self.rank) * self.batch
            for j in range(self.batch):
                yield self.index(base + j), base + j

    def __len__(self):
        return (self.max_iter - self.start_step) * self.batch


class Collate:
    """Stacks samples and applies MLM masking (seeded by the batch's first stream position);
    masked positions are returned as flat indices so the device never has to look for them."""

    def __init__(self, *, mask, seed):
        self.mask, self.seed = mask, seed

    def __call__(self, samples):
        tokens = torch.stack([s['text'] for s in samples])
        out = {'bad': torch.stack([s['bad'] for s in samples]).sum(0)}
        host = [s['images'] for s in samples if 'images' in s]
        if len(host) < len(samples):  # data.decode='device': JPEG bytes and boxes, plus host views
            out.update(images.collate_jpeg(samples))
        if host:
            out['images'] = torch.stack(host)
        if 'text_eda' in samples[0]:
            out['text_eda'] = torch.stack([s['text_eda'] for s in samples])
        if self.mask:
            g = generator(self.seed, samples[0]['position'])
            tokens, labels = text.mask_tokens(tokens, generator=g)
            out['mlm_index'], out['mlm_targets'] = text.mlm_positions(labels)
        out['text'] = tokens
        return out


def split_list(value):
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [v for v in str(value).split(',') if v]


def _worker_init(worker_id):
    torch.set_num_threads(1)


def build_train_loader(cfg, *, rank, world, start_step, max_iter, pin_memory=False):
    """Loader of uint8 view batches [B, V, 3, S, S] with (masked) tokens, MLM positions/targets,
    EDA tokens and bad-sample counts, starting at `start_step`."""
    collate = Collate(mask=cfg.mask, seed=cfg.seed)
    kwargs = dict(batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=collate,
                  pin_memory=pin_memory, worker_init_fn=_worker_init)
    if cfg.workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=cfg.prefetch)
    if cfg.format == 'wds':
        return torch.utils.data.DataLoader(ShardStream(cfg, rank=rank, world=world, start_step=start_step), **kwargs)
    if cfg.format != 'jsonl':
        raise ValueError(f'data.format must be "jsonl" or "wds", got {cfg.format!r}')
    dataset = PairDataset(cfg)
    sampler = IterationSampler(len(dataset), batch_size=cfg.batch_size, world_size=world, rank=rank,
                               max_iter=max_iter, seed=cfg.seed, start_step=start_step)
    return torch.utils.data.DataLoader(dataset, sampler=sampler, drop_last=True, **kwargs)


class EvalDataset(torch.utils.data.Dataset):
    """Labelled images in the ImageNet-val JSON Lines layout (filename, label, label_name[, caption]);
    this rank's share is indices rank, rank+W, ... (no padding duplicates)."""

    def __init__(self, root, meta, *, rank=0, world=1, image_size=224, max_pixels=1 << 28):
        import json
        self.root, self.image_size, self.max_pixels = root, image_size, max_pixels
        if not Path(meta).is_file():
            raise FileNotFoundError(f'evaluation meta file not found: {meta}')
        with open(meta, encoding='utf-8') as f:
            self.records = [json.loads(line) for line in f if line.strip()]
        self.indices = list(range(rank, len(self.records), world))

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        rec = self.records[self.indices[i]]
        img = images.open_image(join_path(self.root, rec['filename']), self.max_pixels)
        return images.eval_view(img, size=self.image_size), int(rec.get('label', -1)), self.indices[i]

    def classes(self):
        """(label, name) pairs of the classes in the file, sorted by label (the reference's order)."""
        names = {int(r['label']): r['label_name'] for r in self.records}
        return [(k, names[k]) for k in sorted(names)]


if __name__ == '__main__':
    raise SystemExit('`python data.py setup` / `make-demo` moved: run `python prepare.py setup` or '
                     '`python prepare.py make-demo`')
