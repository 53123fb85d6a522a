"""Data: JSON Lines and webdataset formats, training samples with bad-input handling, the
iteration sampler and loaders. Nothing here imports model code.

The data folder (vocabulary, synonym table, demo corpus) is `data/` beside this file, or
$DECLIP_DATA when set: the one rule every default path follows.
"""
import codecs
import glob
import itertools
import os
import random
from pathlib import Path

import torch

import images
import jpeg
import runtime
import text
from images import BadSample

ROOT = Path(__file__).resolve().parent
DATA_DIR = Path(os.environ.get('DECLIP_DATA', ROOT / 'data'))
BPE_PATH = DATA_DIR / 'bpe_simple_vocab_16e6.txt.gz'
SYNONYMS_PATH = DATA_DIR / 'wordnet_synonyms.tsv.gz'
SEED_MIX = 1_000_003
SAMPLE_TIMEOUT_S = 60.0                 # default of data.sample_timeout_s
MAX_FILE_BYTES = images.MAX_FILE_BYTES  # default of data.max_file_bytes
BAD_KINDS = ('missing', 'empty_file', 'not_image', 'truncated', 'too_large', 'empty_caption',
             'bad_json', 'bad_encoding', 'bad_tar', 'unreadable', 'not_regular', 'file_too_large',
             'outside_root', 'timeout', 'other')


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

def scan_lines(path, chunk=1 << 24):
    """(offsets of the lines that hold more than whitespace, offsets of the blank ones) of a file
    as int64 numpy arrays: a 15 M-line meta costs 120 MB, not 15 M parsed dicts. Lines of spaces,
    tabs or a lone CR (a Windows-edited file) are blank, as is a UTF-8 byte-order mark at the start."""
    import numpy as np
    found = {True: [], False: []}
    pos, start, content = 0, 0, False  # the line in progress: its offset, whether it has content
    with open(path, 'rb') as f:
        while buf := f.read(chunk):
            arr = np.frombuffer(buf, dtype=np.uint8)
            has = ((arr - np.uint8(9)) > 4) & (arr != 32)  # not \t \n \v \f \r (9..13, uint8 wrap) or space
            if pos == 0 and buf.startswith(codecs.BOM_UTF8):
                has[:3] = False
            nl = np.flatnonzero(arr == 10)
            seg = np.logical_or.reduceat(has, np.concatenate([[0], nl]))  # [0, nl0), [nl0, nl1), ...
            if len(nl):
                found[bool(content or seg[0])].append([start])
                starts, full = nl[:-1] + pos + 1, seg[1:-1]
                found[True].append(starts[full])
                found[False].append(starts[~full])
                start, content = int(nl[-1]) + pos + 1, bool(seg[-1])
            else:
                content = content or bool(seg[0])
            pos += len(buf)
    if content or start < pos:  # a last line without a newline
        found[content].append([start])
    return tuple(np.concatenate(found[k]).astype(np.int64) if found[k] else np.zeros(0, np.int64)
                 for k in (True, False))


def index_lines(path, chunk=1 << 24):
    """Byte offsets of the lines of a file that hold more than whitespace (scan_lines)."""
    return scan_lines(path, chunk)[0]


def join_path(root, filename):
    """The reference's joinpath: object-store prefixes ('s3:') concatenate, otherwise os.path.join
    with a leading '/' of filename stripped."""
    if not root:
        return filename
    if root.endswith(':'):
        return root + filename
    return os.path.join(root, filename.lstrip('/'))


def confined_path(root, filename):
    """join_path(root, filename), refused (BadSample 'outside_root') when a meta line could leave
    the root: a filename with a `..` part (even one that would come back). A leading '/' is
    stripped, the reference's rule, so absolute names stay inside too. Symlinks inside the root
    are its owner's and are followed (a root that is a symlink, or a folder of links to images
    elsewhere, as tools/bench.py builds, keeps working); what they point at must still be a regular file
    of bounded size (images.read_file). An empty root confines nothing: filenames are then paths
    as given."""
    if root and '..' in filename.split('/'):
        raise BadSample('outside_root', f'{filename!r} under {root}')
    return join_path(root, filename)


class JsonlMeta:
    """Random access to the records of several (root, meta file) pairs by line offsets."""

    def __init__(self, roots, metas):
        import numpy as np
        if len(roots) != len(metas):
            raise ValueError(f'{len(roots)} roots for {len(metas)} meta files')
        self.sources = []
        for root, meta in zip(roots, metas):
            if not Path(meta).is_file():
                raise FileNotFoundError(f'meta file not found (or not a regular file): {meta}')
            self.sources.append((root, meta, *scan_lines(meta)))
        self.cumulative = np.cumsum([len(s[2]) for s in self.sources])
        self.handles = {}

    def __len__(self):
        return int(self.cumulative[-1]) if len(self.cumulative) else 0

    def locate(self, i):
        import numpy as np
        src = int(np.searchsorted(self.cumulative, i, side='right'))
        local = i - (int(self.cumulative[src - 1]) if src else 0)
        return src, local

    def where(self, i):
        """'meta:line' of record i (blank lines counted), for messages."""
        import numpy as np
        src, local = self.locate(i)
        _, meta, offsets, blanks = self.sources[src]
        return f'{meta}:{local + 1 + int(np.searchsorted(blanks, offsets[local]))}'

    def record(self, i):
        """(root, record dict); a malformed line raises BadSample (its caller adds where(i))."""
        import json
        src, local = self.locate(i)
        root, meta, offsets, _ = self.sources[src]
        handle = self.handles.get(src)
        if handle is None or handle[0] != os.getpid():  # one handle per worker process
            handle = self.handles[src] = (os.getpid(), open(meta, 'rb'))
        f = handle[1]
        f.seek(int(offsets[local]))
        raw = f.readline()
        try:
            line = raw.decode('utf-8-sig')  # a byte-order mark is no error
        except UnicodeDecodeError as e:
            raise BadSample('bad_encoding', f'{e.reason} at byte {e.start}') from e
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise BadSample('bad_json', str(e)) from e
        if not isinstance(rec, dict) or not isinstance(rec.get('filename'), str):
            raise BadSample('bad_json', 'not an object with a "filename" string')
        return root, rec

    def __getstate__(self):
        return {**self.__dict__, 'handles': {}}


def first_caption(caption):
    """The reference always uses the first caption of a list."""
    if isinstance(caption, (list, tuple)):
        caption = caption[0] if caption else ''
    if not isinstance(caption, str) or not caption.strip():
        raise BadSample('empty_caption', repr(caption)[:60])
    return caption


def iter_tar(path, max_bytes=MAX_FILE_BYTES):
    """('shard:key', {ext: bytes}) groups of consecutive members of a webdataset shard, with the
    standard library. A shard that is not a regular file (images.open_regular) or whose member or
    header is broken ends with a group {'__error__': BadSample}; a member over `max_bytes` is not
    read, its group carries the error."""
    import tarfile
    key, group = None, {}
    try:
        with images.open_regular(path) as f, tarfile.open(fileobj=f, mode='r|*') as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                base, _, ext = os.path.basename(name).partition('.')
                k = f'{path}:{os.path.join(os.path.dirname(name), base)}'
                if k != key and key is not None:
                    yield key, group
                    group = {}
                key = k
                if member.size > max_bytes:
                    group['__error__'] = BadSample('file_too_large', f'{name}: {member.size:,} bytes > '
                                                   f'{max_bytes:,} (data.max_file_bytes)')
                else:
                    group[ext.lower()] = tar.extractfile(member).read()
    except (BadSample, tarfile.TarError, OSError, EOFError) as e:
        if key is not None:
            yield key, group
        yield f'{path}:broken', {'__error__': e if isinstance(e, BadSample) else BadSample('bad_tar', str(e))}
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


def guarded(build, timeout_s):
    """(build(), None, '') or, when it fails or runs past `timeout_s`, (None, kind, detail)."""
    try:
        with images.time_limit(timeout_s):
            return build(), None, ''
    except BadSample as e:
        return None, e.kind, str(e)
    except Exception as e:  # a sample must never stop training or evaluation; the monitor catches patterns
        return None, 'other', f'{type(e).__name__}: {e}'


class SampleBuilder:
    """Turns a caption and an image source into the tensors of one training sample."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.flip = images.moco_views(cfg.augmentation)
        self.tokenizer = get_tokenizer(cfg.bpe_path)
        self.eda = text.EDA(cfg.synonyms_path, use_synonyms=cfg.eda_synonyms) if cfg.eda else None
        self.monitor = FailureMonitor(cfg.bad_window, cfg.max_bad_rate)

    def __call__(self, caption, image, rng):
        caption = self.tokenizer.head(first_caption(caption), self.cfg.context_length)
        raw = images.read_bytes(image, max_bytes=self.cfg.max_file_bytes)
        img = images.open_image(raw, self.cfg.max_pixels)
        crops = dict(views=self.cfg.views, scale=tuple(self.cfg.crop_scale), flip=self.flip)
        if self.cfg.decode == 'device' and jpeg.device_decodable(raw, img):
            out = jpeg.jpeg_sample(raw, img.width, img.height, rng, **crops)
        else:
            out = {'images': images.train_views(img, size=self.cfg.image_size, rng=rng, **crops)}
        length = self.cfg.context_length
        out['text'] = self.tokenizer(caption, length)[0]
        if self.eda is not None:
            out['text_eda'] = self.tokenizer(self.eda(caption, rng), length)[0]
        return out

    def attempt(self, build, where):
        """(sample, None) of build() (guarded, timed), or (None, kind) of a failure, which the
        monitor records with `where` (meta file:line or shard key)."""
        sample, kind, detail = guarded(build, self.cfg.sample_timeout_s)
        self.monitor.record(None if kind is None else f'{where}: {detail}'[:300])
        return sample, kind


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
        roots, metas = text.split_list(cfg.train_root), text.split_list(cfg.train_meta)
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
            def build():
                root, rec = self.meta.record(index)
                return self.builder(rec.get('caption'), confined_path(root, rec['filename']), rng)
            sample, kind = self.builder.attempt(build, self.meta.where(index))
            if sample is not None:
                return {**sample, 'position': position, 'bad': bad_counts(failures)}
            failures.append(kind)
            index = rng.randrange(len(self.meta))
        raise DataError(f'100 consecutive bad samples around position {position}')


class ShardStream(torch.utils.data.IterableDataset):
    """webdataset tar shards (KEY.jpg + KEY.txt [+ KEY.json]) streamed with the standard library.

    Each pass visits the shards in an order derived from (seed, pass). Global worker g of G =
    world x workers takes shards g, g+G, ... (or, with fewer shards than G, every G-th sample), so
    a pass yields every sample exactly once, mixed by a seeded shuffle buffer. Each worker emits
    whole batches and the DataLoader takes them round-robin, so a restart at step k knows how many
    samples each worker had consumed and skips them without decoding. A bad sample is replaced
    by a random other one (as the reference does), one of its own batch only where nothing else
    around it can be built."""

    def __init__(self, cfg, *, rank, world, start_step):
        self.shards = shard_paths(cfg.shards)
        self.cfg, self.rank, self.world, self.start_step = cfg, rank, world, start_step
        self.builder = None

    def samples(self, worker, workers):
        """(pass, key, group) of this worker's share, forever."""
        g, total = self.rank * workers + worker, self.world * workers
        for p in range(1 << 62):
            order = torch.randperm(len(self.shards), generator=generator(self.cfg.seed, p)).tolist()
            by_shard = len(self.shards) >= total
            found, i = False, 0
            for s in order[g::total] if by_shard else order:
                for key, group in iter_tar(self.shards[s], self.cfg.max_file_bytes):
                    if by_shard or i % total == g:
                        found = True
                        yield p, key, group
                    i += 1
            if not found:
                raise DataError(f'loader worker {g} of {total} (ranks x data.workers) gets no sample of '
                                f'data.shards={self.cfg.shards!r}: use fewer workers or more samples')

    def shuffled(self, worker, workers, buffer):
        """samples() through a seeded shuffle buffer (`buffer`, which the caller may read) of
        data.shuffle_buffer samples: a new sample takes the place of a random one, which leaves;
        at the end of a pass the rest leave in random order."""
        size, current, rng = max(int(self.cfg.shuffle_buffer), 1), None, None
        for item in self.samples(worker, workers):
            if item[0] != current:
                if rng is not None:
                    rng.shuffle(buffer)
                while buffer:
                    yield buffer.pop()
                current, rng = item[0], seeded_rng(self.cfg.seed, 'shuffle', self.rank, worker, item[0])
            if len(buffer) < size:
                buffer.append(item)
                continue
            j = rng.randrange(size)
            buffer[j], item = item, buffer[j]
            yield item

    def build(self, group, rng):
        if '__error__' in group:
            raise group['__error__']
        image = next((group[e] for e in ('jpg', 'jpeg', 'png', 'webp') if e in group), None)
        if image is None or 'txt' not in group:
            raise BadSample('bad_tar', f'members {sorted(group)}')
        try:
            caption = group['txt'].decode('utf-8')
        except UnicodeDecodeError as e:
            raise BadSample('bad_encoding', 'txt') from e
        return self.builder(caption, image, rng)

    def batch(self, items, spares, share, start):
        """The samples of `items` ((pass, key, group) at positions start, ...), failures replaced."""
        used, failed = {key for _, key, _ in items}, set()
        for j, (_, key, group) in enumerate(items):
            position, failures = start + j, []
            rng = seeded_rng(self.cfg.seed, 'wds', self.rank, share[0], position)
            sample, kind = self.builder.attempt(lambda: self.build(group, rng), key)
            while sample is None:
                failures.append(kind)
                failed.add(key)
                key, group = self.replacement(key, [items, *spares], used, failed, share, rng, len(failures))
                used.add(key)
                sample, kind = self.builder.attempt(lambda: self.build(group, rng), key)
            yield {**sample, 'position': position, 'bad': bad_counts(failures)}

    def replacement(self, key, around, used, failed, share, rng, tries):
        """(key, group) to try in place of `key`: a random one of the batch, the neighbouring batches
        and the shuffle buffer (`around`) not in the batch yet, as the reference does, else one
        already in it (a tiny corpus repeats samples), else the first of this worker's shards
        (`share`) that has not failed. Only the rate limit or 100 failures in a row stop the run."""
        known = [s for part in around for s in part if s[1] not in failed]
        fresh = [s for s in known if s[1] not in used]
        anywhere = (s for s in itertools.islice(self.samples(*share), 1_000) if s[1] not in failed)
        found = (rng.choice(fresh or known) if known else next(anywhere, None)) if tries <= 100 else None
        if found is None:
            raise DataError(f'no good sample to replace {key}: {tries} tries failed, none of the samples around it '
                            f'or of the first 1,000 of loader worker {share[0]}\'s shards can be built')
        return found[1:]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.builder is None:
            self.builder = SampleBuilder(self.cfg)
        # the loader asks worker 0 first, so after k steps worker w plays the role of the worker
        # that would have produced step k + w
        worker = (worker + self.start_step) % workers
        size = self.cfg.batch_size
        skip = len(range(worker, self.start_step, workers)) * size
        buffer = []
        stream = self.shuffled(worker, workers, buffer)
        previous, current = [], list(itertools.islice(stream, size))
        for start in itertools.count(0, size):
            following = list(itertools.islice(stream, size))
            if start >= skip:
                yield from self.batch(current, (previous, following, buffer), (worker, workers), start)
            previous, current = current, following


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
    """Stacks samples and applies MLM masking, each `micro` samples (one device's batch; several
    with config.accum_steps) seeded by their first stream position; masked positions are
    returned as flat indices so the device never has to look for them."""

    def __init__(self, *, mask, seed, micro=None):
        self.mask, self.seed, self.micro = mask, seed, micro

    def __call__(self, samples):
        tokens = torch.stack([s['text'] for s in samples])
        out = {'bad': torch.stack([s['bad'] for s in samples]).sum(0)}
        host = [s['images'] for s in samples if 'images' in s]
        if len(host) < len(samples):  # data.decode='device': JPEG bytes and boxes, plus host views
            out.update(jpeg.collate_jpeg(samples))
        if host:
            out['images'] = torch.stack(host)
        if 'text_eda' in samples[0]:
            out['text_eda'] = torch.stack([s['text_eda'] for s in samples])
        if self.mask:
            micro = self.micro or len(samples)
            masked = [text.mask_tokens(tokens[i:i + micro], generator=generator(self.seed, samples[i]['position']))
                      for i in range(0, len(samples), micro)]
            tokens = torch.cat([t for t, _ in masked])
            out['mlm_index'], out['mlm_targets'] = text.mlm_positions(torch.cat([lab for _, lab in masked]))
        out['text'] = tokens
        return out


def shard_paths(spec):
    """The sorted shard files of data.shards: comma-separated entries, each brace-expanded
    (text.expand_braces), then a glob pattern (what matches) or a path (which must exist)."""
    paths, missing = set(), []
    for entry in text.split_list(spec, braces=True):
        for name in text.expand_braces(entry):
            if glob.has_magic(name):
                paths.update(glob.glob(name))
            elif os.path.lexists(name):
                paths.add(name)
            else:
                missing.append(name)
    if missing:
        raise FileNotFoundError(f'{len(missing):,} shard(s) of data.shards={spec!r} do not exist: '
                                + ', '.join(missing[:3]) + (', ...' if len(missing) > 3 else ''))
    if not paths:
        raise FileNotFoundError(f'no shards match data.shards={spec!r}')
    return sorted(paths)


def build_train_loader(cfg, *, rank, world, start_step, max_iter, pin_memory=False, accum=1):
    """Loader of uint8 view batches [B, V, 3, S, S] with (masked) tokens, MLM positions/targets,
    EDA tokens and bad-sample counts, starting at `start_step`. With `accum` = k a batch holds
    the k micro-batches of virtual ranks rank*k .. rank*k+k-1 of a k*world job (JSON Lines: the
    same stream positions, since (t*W + r)*kB = (t*kW + rk)*B; each micro-batch masked alone)."""
    collate = Collate(mask=cfg.mask, seed=cfg.seed, micro=cfg.batch_size)
    kwargs = dict(batch_size=cfg.batch_size * accum, num_workers=cfg.workers, collate_fn=collate,
                  pin_memory=pin_memory, worker_init_fn=runtime.loader_worker_init)
    if cfg.workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=cfg.prefetch)
    if cfg.format == 'wds':
        return torch.utils.data.DataLoader(ShardStream(cfg, rank=rank, world=world, start_step=start_step), **kwargs)
    if cfg.format != 'jsonl':
        raise ValueError(f'data.format must be "jsonl" or "wds", got {cfg.format!r}')
    dataset = PairDataset(cfg)
    sampler = IterationSampler(len(dataset), batch_size=cfg.batch_size * accum, world_size=world, rank=rank,
                               max_iter=max_iter, seed=cfg.seed, start_step=start_step)
    return torch.utils.data.DataLoader(dataset, sampler=sampler, drop_last=True, **kwargs)


if __name__ == '__main__':
    raise SystemExit('`python data.py setup` / `make-demo` moved: run `python tools/prepare.py setup` or '
                     '`python tools/prepare.py make-demo`')


# ----------------------------------------------------------------------------------------------
# Checks of the data block of a config, before any work (naming the key or path)
# ----------------------------------------------------------------------------------------------

def _need(key, path, kind='file'):
    if not path or not (Path(path).is_file() if kind == 'file' else Path(path).is_dir()):
        raise ValueError(f'config.data.{key}: {kind} not found: {path!r}')


def check_config(cfg):
    """Every file and folder the data block names exists, the format, augmentation and decode are
    known, and a training meta file is not empty."""
    _need('bpe_path', cfg.bpe_path)
    if cfg.eda and cfg.eda_synonyms:
        _need('synonyms_path (or set --config.data.eda_synonyms=False)', cfg.synonyms_path)
    if cfg.format == 'jsonl':
        metas, roots = text.split_list(cfg.train_meta), text.split_list(cfg.train_root)
        if not metas:
            raise ValueError('config.data.train_meta: no meta file given')
        if len(roots) != len(metas):
            raise ValueError(f'config.data.train_root: {len(roots)} roots for {len(metas)} meta files')
        for meta, root in zip(metas, roots):
            _need('train_meta', meta)
            _need('train_root', root, 'folder')
            with open(meta, 'rb') as f:
                if not f.read(1 << 20).strip():
                    raise ValueError(f'config.data.train_meta: {meta} has no samples')
    elif cfg.format == 'wds':
        try:
            shard_paths(cfg.shards)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f'config.data.shards: {e}') from e
        if not isinstance(cfg.shuffle_buffer, int) or cfg.shuffle_buffer < 0:
            raise ValueError(f'config.data.shuffle_buffer: a sample count >= 0, got {cfg.shuffle_buffer!r}')
    else:
        raise ValueError(f'config.data.format: "jsonl" or "wds", got {cfg.format!r}')
    if cfg.val_meta:
        _need('val_meta', cfg.val_meta)
        _need('val_root', cfg.val_root, 'folder')
    cfg.augmentation = images.augmentation_name(cfg.augmentation)
    if cfg.decode not in ('host', 'device'):
        raise ValueError(f'config.data.decode: "host" or "device", got {cfg.decode!r}')
    if cfg.decode == 'device':
        jpeg.nvjpeg_decoder('cpu')  # torchvision must be importable before any work starts
