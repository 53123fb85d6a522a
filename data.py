"""Data: the JSON Lines format, training samples, the iteration sampler and batches, for input
that is well formed (the loader that reads them under limits, replaces bad samples and streams
webdataset shards is loader.py, around this). Nothing here imports model code.

The data folder (vocabulary, synonym table, demo corpus) is `data/` beside this file, or
$DECLIP_DATA when set: the one rule every default path follows.
"""
import codecs
import os
from pathlib import Path

import torch

import images
import text
from seeds import generator, seeded_rng

ROOT = Path(__file__).resolve().parent
DATA_DIR = Path(os.environ.get('DECLIP_DATA', ROOT / 'data'))
BPE_PATH = DATA_DIR / 'bpe_simple_vocab_16e6.txt.gz'
SYNONYMS_PATH = DATA_DIR / 'wordnet_synonyms.tsv.gz'


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
# The JSON Lines format (YFCC15M / ImageNet-val layout)
# ----------------------------------------------------------------------------------------------

class RecordError(ValueError):
    """A meta line or caption the format does not allow; `kind` names the rule it breaks (one of
    KINDS, which whoever counts bad samples also knows)."""
    KINDS = ('bad_encoding', 'bad_json', 'empty_caption')

    def __init__(self, kind, detail=''):
        super().__init__(f'{kind}: {detail}')
        self.kind = kind


def join_path(root, filename):
    """The reference's joinpath: object-store prefixes ('s3:') concatenate, otherwise os.path.join
    with a leading '/' of filename stripped."""
    if not root:
        return filename
    if root.endswith(':'):
        return root + filename
    return os.path.join(root, filename.lstrip('/'))


def scan_lines(path, chunk=1 << 24, digest=None):
    """(offsets of the lines that hold more than whitespace, offsets of the blank ones) of a file
    as int64 numpy arrays: a 15 M-line meta costs 120 MB, not 15 M parsed dicts. Lines of spaces,
    tabs or a lone CR (a Windows-edited file) are blank, as is a UTF-8 byte-order mark at the start.
    `digest` (a hashlib object), if given, is fed every byte in the same pass."""
    import numpy as np
    found = {True: [], False: []}
    pos, start, content = 0, 0, False  # the line in progress: its offset, whether it has content
    with open(path, 'rb') as f:
        while buf := f.read(chunk):
            if digest is not None:
                digest.update(buf)
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


class JsonlMeta:
    """Random access to the records of several (root, meta file) pairs by line offsets. `sha256`:
    of the meta files' bytes, in order (one file: what sha256sum prints), taken while indexing
    them, so a checkpoint can tell an edited meta without reading it twice."""

    def __init__(self, roots, metas):
        import hashlib
        import numpy as np
        if len(roots) != len(metas):
            raise ValueError(f'{len(roots)} roots for {len(metas)} meta files')
        self.sources, digest = [], hashlib.sha256()
        for root, meta in zip(roots, metas):
            if not Path(meta).is_file():
                raise FileNotFoundError(f'meta file not found (or not a regular file): {meta}')
            self.sources.append((root, meta, *scan_lines(meta, digest=digest)))
        self.sha256 = digest.hexdigest()
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
        """(root, record dict); a malformed line raises RecordError (its caller adds where(i))."""
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
            raise RecordError('bad_encoding', f'{e.reason} at byte {e.start}') from e
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise RecordError('bad_json', str(e)) from e
        if not isinstance(rec, dict) or not isinstance(rec.get('filename'), str) or 'caption' not in rec:
            found = f'keys {sorted(rec)}' if isinstance(rec, dict) else f'a JSON {type(rec).__name__}'
            raise RecordError('bad_json', f'{found}, expected an object with "filename" (a string) and "caption"')
        return root, rec

    def __getstate__(self):
        return {**self.__dict__, 'handles': {}}


def first_caption(caption):
    """The reference always uses the first caption of a list."""
    if isinstance(caption, (list, tuple)):
        caption = caption[0] if caption else ''
    if not isinstance(caption, str) or not caption.strip():
        raise RecordError('empty_caption', repr(caption)[:60])
    return caption


# ----------------------------------------------------------------------------------------------
# Training samples, sampler, batches
# ----------------------------------------------------------------------------------------------

class SampleBuilder:
    """Turns a caption (a non-empty string: first_caption's) and an image file's bytes into the
    tensors of one training sample."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.flip = images.moco_views(cfg.augmentation)
        self.tokenizer = get_tokenizer(cfg.bpe_path)
        self.eda = text.EDA(cfg.synonyms_path, use_synonyms=cfg.eda_synonyms) if cfg.eda else None

    def __call__(self, caption, image, rng):
        caption = self.tokenizer.head(caption, self.cfg.context_length)
        out = self.image_views(image, rng)
        length = self.cfg.context_length
        out['text'] = self.tokenizer(caption, length)[0]
        if self.eda is not None:
            out['text_eda'] = self.tokenizer(self.eda(caption, rng), length)[0]
        return out

    def crops(self):
        """The random crops of a sample's views: how many, their area range, whether flipped."""
        return dict(views=self.cfg.views, scale=tuple(self.cfg.crop_scale), flip=self.flip)

    def image_views(self, raw, rng):
        """{'images': uint8 views [V, 3, S, S]} of an image file's bytes."""
        return self.host_views(images.open_bytes(raw), rng)

    def host_views(self, img, rng):
        """{'images': uint8 views [V, 3, S, S]} of an opened PIL image, decoded and cropped here."""
        return {'images': images.train_views(img, size=self.cfg.image_size, rng=rng, **self.crops())}


def read_image_file(path):
    """The bytes of an image file."""
    return Path(path).read_bytes()


class PairDataset(torch.utils.data.Dataset):
    """Image-caption pairs of JSON Lines metas (YFCC15M layout). Items are (index, position)
    pairs from IterationSampler; the position seeds every random choice of the sample, so a
    resumed run sees identical samples. `builder` makes the tensors (SampleBuilder), `locate`
    turns a record's (root, filename) into a path (join_path) and `read` gets its bytes
    (read_image_file): the loader passes guarded ones."""

    def __init__(self, cfg, *, builder=None, locate=join_path, read=read_image_file):
        roots, metas = text.split_list(cfg.train_root), text.split_list(cfg.train_meta)
        self.meta = JsonlMeta(roots, metas)
        if len(self.meta) == 0:
            raise ValueError(f'no samples in {metas}')
        self.builder = builder or SampleBuilder(cfg)
        self.locate, self.read, self.seed = locate, read, cfg.seed

    def __len__(self):
        return len(self.meta)

    def build(self, index, rng):
        """The sample of record `index`, its random choices drawn from `rng`."""
        root, rec = self.meta.record(index)
        path = self.locate(root, rec['filename'])
        caption = first_caption(rec['caption'])   # before the file is read: a bad line costs no read
        return self.builder(caption, self.read(path), rng)

    def __getitem__(self, item):
        index, position = item
        return {**self.build(index, seeded_rng(self.seed, position)), 'position': position}


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
        tokens, out = torch.stack([s['text'] for s in samples]), self.views(samples)
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

    def views(self, samples):
        return {'images': torch.stack([s['images'] for s in samples])}


if __name__ == '__main__':
    raise SystemExit('`python data.py setup` / `make-demo` moved: run `python tools/prepare.py setup` or '
                     '`python tools/prepare.py make-demo`')
