"""Guarded reading, the shell around the data core: files opened only when regular and read only up to
a bound, paths kept inside their root, a time limit on each sample, the accounting of the samples
that fail (BadSample kinds, the failure rate, counts per kind), and the training set behind all of
it (GuardedDataset: a failing sample replaced by a deterministic other one)."""
import collections
import contextlib
import functools
import io
import os
import stat
from pathlib import Path

import torch

import data
import images
from seeds import seeded_rng


class BadSample(Exception):
    """A sample that cannot be built; `kind` names the failure for the counters."""

    def __init__(self, kind, detail=''):
        super().__init__(f'{kind}: {detail}')
        self.kind = kind


MAX_FILE_BYTES = 64 << 20  # default bound on the bytes of one image file (data.limits.max_file_bytes)
SAMPLE_TIMEOUT_S = 60.0    # default time limit on one sample (data.limits.sample_timeout_s)
BAD_KINDS = ('missing', 'empty_file', 'not_image', 'truncated', 'too_large', 'empty_caption',
             'bad_json', 'bad_encoding', 'bad_tar', 'unreadable', 'not_regular', 'file_too_large',
             'outside_root', 'timeout', 'bad_name', 'other')
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def open_regular(path):
    """A binary file object of `path` if, symlinks followed, it is a regular file. Anything else
    (FIFO, device, socket, directory) is refused before it is opened: a FIFO blocks its reader
    forever and /dev/zero never ends. O_NONBLOCK keeps even a racing FIFO's open from waiting for
    a writer, and the type is checked again on the open descriptor."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise BadSample('not_regular', str(path))
        fd = os.open(path, _OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise BadSample('missing', str(path)) from e
    except OSError as e:
        raise BadSample('unreadable', f'{path}: {e.strerror or e}') from e
    f = os.fdopen(fd, 'rb')
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise BadSample('not_regular', str(path))
    return f


def read_file(path, *, max_bytes):
    """The bytes of a regular file (open_regular) of at most `max_bytes`; a bigger one is a
    BadSample 'file_too_large', found from its size or, for files that misreport it, by reading
    one byte past the bound."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise BadSample('file_too_large', f'{path}: {size:,} bytes > {max_bytes:,} (data.limits.max_file_bytes)')
        try:
            raw = f.read(size + 1)
            if len(raw) > size:  # grew, or a size of 0 that means "unknown"
                raw += f.read(max_bytes + 1 - len(raw))
        except (OSError, TypeError) as e:  # TypeError: a non-blocking read that had no data
            raise BadSample('unreadable', f'{path}: {e}') from e
    if len(raw) > max_bytes:
        raise BadSample('file_too_large', f'{path}: more than {max_bytes:,} bytes (data.limits.max_file_bytes)')
    return raw


@contextlib.contextmanager
def time_limit(seconds):
    """Raise BadSample 'timeout' in the body after `seconds` (SIGALRM from ITIMER_REAL), so that no
    sample holds a loader worker, or the main process with data.workers=0, forever: a blocked read
    is interrupted too. Signals reach the main thread only: in another thread, with seconds <= 0
    or while a real-time timer of someone else is running (it is left alone), the body runs
    without a limit. The previous SIGALRM handler is restored."""
    import signal
    import threading
    if (seconds <= 0 or threading.current_thread() is not threading.main_thread()
            or signal.getitimer(signal.ITIMER_REAL)[0] > 0):
        yield
        return

    def expire(signum, frame):
        raise BadSample('timeout', f'over {seconds:g} s (data.limits.sample_timeout_s)')
    previous = signal.signal(signal.SIGALRM, expire)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        yield
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:  # even when the alarm fires between the body's end and the line above
            signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)


def read_bytes(source, *, max_bytes=MAX_FILE_BYTES):
    """The bytes of a path (read_file: a missing, irregular or too large file is a BadSample) or
    bytes as given (bounded by whoever read them, e.g. shards.iter_tar); empty ones are a BadSample."""
    raw = read_file(source, max_bytes=max_bytes) if isinstance(source, (str, Path)) else source
    if not raw:
        raise BadSample('empty_file', str(source) if isinstance(source, (str, Path)) else '')
    return raw


def open_image(source, max_pixels, *, max_bytes=MAX_FILE_BYTES):
    """Open (header only) a path or bytes as a PIL image; size checked before any decoding."""
    from PIL import Image, UnidentifiedImageError
    raw = read_bytes(source, max_bytes=max_bytes)
    try:
        img = Image.open(io.BytesIO(raw))
    except UnidentifiedImageError as e:
        raise BadSample('not_image', str(e)) from e
    except Image.DecompressionBombError as e:
        raise BadSample('too_large', str(e)) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # header cut short
        raise BadSample('truncated', str(e)) from e
    if img.width * img.height > max_pixels:
        raise BadSample('too_large', f'{img.width}x{img.height}')
    return img


def confined_path(root, filename):
    """data.join_path(root, filename), refused (BadSample 'outside_root') when a meta line could leave
    the root: a filename with a `..` part (even one that would come back). A leading '/' is
    stripped, the reference's rule, so absolute names stay inside too. Symlinks inside the root
    are its owner's and are followed (a root that is a symlink, or a folder of links to images
    elsewhere, as tools/bench.py builds, keeps working); what they point at must still be a regular file
    of bounded size (read_file). An empty root confines nothing: filenames are then paths
    as given. A NUL character, which no file name can hold, is 'bad_name'."""
    if '\0' in filename:
        raise BadSample('bad_name', f'{filename!r}: a file name cannot hold a NUL character')
    if root and '..' in filename.split('/'):
        raise BadSample('outside_root', f'{filename!r} under {root}')
    return data.join_path(root, filename)


class DataError(RuntimeError):
    """Too many bad samples: the corpus (or its paths) is wrong, not just a few files."""


class FailureMonitor:
    """Failure rate over the last `window` attempts of this process; above `max_rate` it raises
    a DataError naming examples. Failures are 'where: kind: detail' (meta file:line or shard key);
    the first ones are kept for every message, since a corpus given wrong fails the same way from
    its first sample and the first failure is the one that says how."""

    def __init__(self, window, max_rate):
        self.window, self.max_rate = window, max_rate
        self.recent = collections.deque(maxlen=window)
        self.first, self.examples = [], collections.deque(maxlen=5)

    def record(self, failure=None):
        self.recent.append(failure is not None)
        if failure is not None:
            if len(self.first) < 3 and failure not in self.first:
                self.first.append(failure)
            self.examples.append(failure)
            rate = sum(self.recent) / len(self.recent)
            if len(self.recent) == self.window and rate > self.max_rate:
                raise self.error(f'{rate:.0%} of the last {self.window} samples could not be built (limit '
                                 f'{self.max_rate:.0%}, data.limits.max_bad_rate)')

    def error(self, summary):
        """A DataError: `summary` and the first failure on one line, then the other first ones and
        the latest, one a line (any guard that gives up names what the monitor saw)."""
        shown = self.first + [e for e in self.examples if e not in self.first]
        if not shown:
            return DataError(summary)
        return DataError(f'{summary}; the first: {shown[0]}' + ''.join(f'\n  {e}' for e in shown[1:]))


def error_message(error):
    """A DataError's own message, also when a loader worker raised it (torch raises it again in the
    training process with the worker's traceback in front)."""
    text, mark = str(error), f'\n{DataError.__module__}.{DataError.__qualname__}: '
    return text[text.rfind(mark) + len(mark):].rstrip() if text.startswith('Caught ') and mark in text else text


def guarded(build, timeout_s):
    """(build(), None, '') or, when it fails or runs past `timeout_s`, (None, kind, detail); the
    core's own errors for malformed input are counted by the kinds they name."""
    try:
        with time_limit(timeout_s):
            return build(), None, ''
    except (BadSample, data.RecordError) as e:
        return None, e.kind, str(e)
    except images.DecodeError as e:
        return None, 'truncated', f'truncated: {e}'
    except Exception as e:  # a sample must never stop training or evaluation; the monitor catches patterns
        return None, 'other', f'other: {type(e).__name__}: {e}'


def by_kind(counts):
    """{kind: count} of a count vector in BAD_KINDS order (a scalar 0, a state that has seen no
    batch and was not sized, counts 0 of every kind)."""
    return dict(zip(BAD_KINDS, (torch.zeros(len(BAD_KINDS), dtype=torch.long) + counts.cpu()).tolist()))


def from_kinds(totals):
    """The count vector of {kind: count} (kinds this code does not know are dropped); a list is
    the first ten kinds of older checkpoints."""
    if isinstance(totals, list):
        totals = dict(zip(BAD_KINDS[:9] + ('other',), totals))
    return torch.tensor([totals.get(k, 0) for k in BAD_KINDS], dtype=torch.long)


def bad_counts(kinds):
    """The count vector (BAD_KINDS order) of a list of failure kinds."""
    counts = torch.zeros(len(BAD_KINDS), dtype=torch.long)
    for kind in kinds:
        counts[BAD_KINDS.index(kind)] += 1
    return counts


class SampleGuard:
    """Builds the samples of one process under data.limits: each attempt timed, and its outcome
    recorded by the failure monitor."""

    def __init__(self, limits):
        self.timeout_s = limits.sample_timeout_s
        self.monitor = FailureMonitor(limits.bad_window, limits.max_bad_rate)

    def attempt(self, build, where):
        """(sample, None) of build(), or (None, kind) of a failure, which the monitor records with
        `where` (meta file:line or shard key)."""
        sample, kind, detail = guarded(build, self.timeout_s)
        self.monitor.record(None if kind is None else f'{where}: {detail}'[:300])
        return sample, kind


class GuardedBuilder(data.SampleBuilder):
    """data.SampleBuilder whose images are opened by open_image: an empty file, one that is no
    image or whose header is cut short, or one over data.limits.max_pixels is a BadSample of its
    kind before any pixel is decoded."""

    def image_views(self, raw, rng):
        return self.host_views(self.open(raw), rng)

    def open(self, raw):
        return open_image(raw, self.cfg.limits.max_pixels)


def guarded_pairs(cfg, builder):
    """data.PairDataset of data config `cfg` whose paths stay inside their root (confined_path) and
    whose files are regular and at most data.limits.max_file_bytes (read_bytes); picklable, for
    loader workers started by spawn. `builder`: GuardedBuilder or a subclass."""
    return data.PairDataset(cfg, builder=builder, locate=confined_path,
                            read=functools.partial(read_bytes, max_bytes=cfg.limits.max_file_bytes))


class GuardedDataset(torch.utils.data.Dataset):
    """A data.PairDataset whose samples are built under SampleGuard: one that fails is replaced
    by a record drawn from the same seeded stream, so a resumed run sees identical samples; each
    sample carries the kinds of the failures it replaced ('bad': counts in BAD_KINDS order)."""

    def __init__(self, dataset, limits):
        self.dataset, self.guard = dataset, SampleGuard(limits)
        self.monitor = self.guard.monitor

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, position = item
        rng = seeded_rng(self.dataset.seed, position)
        failures = []
        for _ in range(100):
            sample, kind = self.guard.attempt(lambda: self.dataset.build(index, rng), self.dataset.meta.where(index))
            if sample is not None:
                return {**sample, 'position': position, 'bad': bad_counts(failures)}
            failures.append(kind)
            index = rng.randrange(len(self.dataset))
        raise self.monitor.error(f'100 consecutive bad samples around position {position}')
