"""webdataset tar shards, read with the standard library and streamed to the loader: the shard files of
data.shards, their groups of members, and each loader worker's share of them, shuffled, with bad
samples replaced."""
import glob
import itertools
import os

import torch

import data
import text
from guard import MAX_FILE_BYTES, BadSample, DataError, SampleGuard, bad_counts, open_regular
from seeds import generator, seeded_rng


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


def shard_identity(paths):
    """{'format': 'wds', 'shards': count, 'sha256': of the 'name size' lines of the sorted shards}:
    a shard added, removed, renamed or rewritten to another size changes it; nothing is read."""
    import hashlib
    listing = sorted(f'{os.path.basename(p)} {os.stat(p).st_size}' for p in paths)
    digest = hashlib.sha256('\n'.join(listing).encode()).hexdigest()
    return {'format': 'wds', 'shards': len(listing), 'sha256': digest}


IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')   # a sample's image member; its caption is .txt


def split_member(name):
    """(key, extension) of a member name: 'a/b.c.jpg' is key 'a/b', extension 'c.jpg' (webdataset's rule)."""
    base, _, ext = os.path.basename(name).partition('.')
    return os.path.join(os.path.dirname(name), base), ext.lower()


def probe_shard(path, members=20):
    """What makes `path` no shard at all, from its first `members` members, or None: a folder, a file
    that tarfile cannot open, or members not grouped by key (no image with its .txt beside it: a shard
    packed as all images, then all captions). A file that is not regular, or a member broken later,
    is the loader's to count."""
    import tarfile
    if os.path.isdir(path):
        return f'{path} is a folder, not a tar shard: name the shards in it, e.g. {os.path.join(path, "*.tar")!r}'
    names = []
    try:
        with open_regular(path) as f, tarfile.open(fileobj=f, mode='r:*') as tar:
            while len(names) < members and (member := tar.next()) is not None:
                names += [member.name] if member.isfile() else []
    except BadSample:
        return None
    except (tarfile.TarError, OSError, EOFError) as e:
        if not names:
            return f'{path} is not a tar file ({e})'
    groups = [{split_member(n)[1] for n in group} for _, group in itertools.groupby(names, lambda n: split_member(n)[0])]
    if names and not any('txt' in g and g & set(IMAGE_EXTS) for g in groups):
        return (f'{path}: none of its first {len(names)} members ({", ".join(names[:3])}, ...) is an image with its '
                f'.txt caption beside it; expected each sample\'s members together (KEY.jpg, KEY.txt, ...), as a '
                f'tar of the files sorted by name holds them')
    return None


def iter_tar(path, max_bytes=MAX_FILE_BYTES):
    """('shard:key', {ext: bytes}) groups of consecutive members of a webdataset shard, with the
    standard library. A shard that is not a regular file (open_regular) or whose member or
    header is broken ends with a group {'__error__': BadSample}; a member over `max_bytes` is not
    read, its group carries the error."""
    import tarfile
    key, group = None, {}
    try:
        with open_regular(path) as f, tarfile.open(fileobj=f, mode='r|*') as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                base, ext = split_member(name)
                k = f'{path}:{base}'
                if k != key and key is not None:
                    yield key, group
                    group = {}
                key = k
                if member.size > max_bytes:
                    group['__error__'] = BadSample('file_too_large', f'{name}: {member.size:,} bytes > '
                                                   f'{max_bytes:,} (data.limits.max_file_bytes)')
                else:
                    group[ext] = tar.extractfile(member).read()
    except (BadSample, tarfile.TarError, OSError, EOFError) as e:
        if key is not None:
            yield key, group
        yield f'{path}:broken', {'__error__': e if isinstance(e, BadSample) else BadSample('bad_tar', str(e))}
        return
    if key is not None:
        yield key, group


class ShardStream(torch.utils.data.IterableDataset):
    """webdataset tar shards (KEY.jpg + KEY.txt [+ KEY.json]) streamed with the standard library.

    Each pass visits the shards in an order derived from (seed, pass). Global worker g of G =
    world x workers takes shards g, g+G, ... (or, with fewer shards than G, every G-th sample), so
    a pass yields every sample exactly once, mixed by a seeded shuffle buffer. Each worker emits
    whole batches and the DataLoader takes them round-robin, so a restart at step k knows how many
    samples each worker had consumed and skips them without decoding. A bad sample is replaced
    by a random other one (as the reference does), one of its own batch only where nothing else
    around it can be built. `make_builder(cfg)` makes the samples (a data.SampleBuilder; the
    loader's opens images under limits), under a guard.SampleGuard, both made once in each loader
    worker."""

    def __init__(self, cfg, *, rank, world, start_step, make_builder):
        self.shards = shard_paths(cfg.shards)
        self.cfg, self.rank, self.world, self.start_step = cfg, rank, world, start_step
        self.make_builder, self.builder, self.guard = make_builder, None, None

    def samples(self, worker, workers):
        """(pass, key, group) of this worker's share, forever."""
        g, total = self.rank * workers + worker, self.world * workers
        for p in range(1 << 62):
            order = torch.randperm(len(self.shards), generator=generator(self.cfg.seed, p)).tolist()
            by_shard = len(self.shards) >= total
            found, i = False, 0
            for s in order[g::total] if by_shard else order:
                for key, group in iter_tar(self.shards[s], self.cfg.limits.max_file_bytes):
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
        image = next((group[e] for e in IMAGE_EXTS if e in group), None)
        if image is None or 'txt' not in group:
            raise BadSample('bad_tar', f'members {sorted(group)}, expected an image ({", ".join(IMAGE_EXTS)}) and '
                                       f'a txt caption side by side')
        try:
            caption = group['txt'].decode('utf-8')
        except UnicodeDecodeError as e:
            raise BadSample('bad_encoding', 'txt') from e
        return self.builder(data.first_caption(caption), image, rng)

    def batch(self, items, spares, share, start):
        """The samples of `items` ((pass, key, group) at positions start, ...), failures replaced."""
        used, failed = {key for _, key, _ in items}, set()
        for j, (_, key, group) in enumerate(items):
            position, failures = start + j, []
            rng = seeded_rng(self.cfg.seed, 'wds', self.rank, share[0], position)
            sample, kind = self.guard.attempt(lambda: self.build(group, rng), key)
            while sample is None:
                failures.append(kind)
                failed.add(key)
                key, group = self.replacement(key, [items, *spares], used, failed, share, rng, len(failures))
                used.add(key)
                sample, kind = self.guard.attempt(lambda: self.build(group, rng), key)
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
            raise self.guard.monitor.error(
                f'no good sample to replace {key}: {tries} tries failed, none of the samples around it or of the '
                f'first 1,000 of loader worker {share[0]}\'s shards can be built')
        return found[1:]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.builder is None:
            self.builder, self.guard = self.make_builder(self.cfg), SampleGuard(self.cfg.limits)
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
