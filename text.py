"""Text: CLIP byte-level BPE tokenizer with DeCLIP's <|mask|> id, MLM masking, EDA caption augmentation,
shell-style brace expansion of name patterns, zero-shot prompt templates."""
import collections
import functools
import gzip
import html
import itertools
from pathlib import Path

import ftfy
import regex
import torch

ROOT = Path(__file__).resolve().parent

# DeCLIP's ids: <|mask|> is appended after the 49,406 BPE tokens, before sot and eot (OpenAI's
# CLIP has no mask token: there sot/eot are 49406/49407).
MASK_ID, SOT_ID, EOT_ID, VOCAB_SIZE = 49406, 49407, 49408, 49409
CONTEXT_LENGTH = 77
IGNORE_INDEX = -100
_WORD = regex.compile(r'\S+')


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
    """OpenAI CLIP byte-level BPE with DeCLIP's id layout: ... 49405, <|mask|>, sot, eot.

    Special ids come from the code only (tokens(), mask_tokens): caption text is split into
    words, numbers and punctuation runs, so a literal '<|mask|>', '<|startoftext|>' or
    '<|endoftext|>' in a caption is the BPE of '<|', the word and '|>'. (The reference gives
    those pieces for '<|mask|>' but the special ids for sot/eot, which would let a caption move
    the eot pooling position.)"""

    _split = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

    def __init__(self, bpe_path):
        bpe_path = Path(bpe_path)
        if not bpe_path.is_file():
            raise FileNotFoundError(
                f'BPE vocabulary not found at {bpe_path}: run `python tools/prepare.py setup` (or set '
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
        self.longest = max(map(len, vocab))  # characters of the longest vocabulary entry
        self.cache = {}

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

    def head(self, text, context_length=CONTEXT_LENGTH):
        """The part of `text` that its first context_length - 2 tokens come from, with room to
        spare, so that a megabyte caption costs what a short one does (cleaning, BPE and EDA then
        run on this prefix only).

        The prefix ends after a whole word (whitespace-separated): 2 x (context_length - 2) words
        at first, twice as many until they give 2 x (context_length - 2) tokens (twice the context,
        so that EDA's deletions still fill it). Cleaning never joins two words and BPE works within
        a word, so the tokens of whole leading words are the caption's leading tokens: the cut
        removes none that truncation would keep (ftfy repairs mis-encoded text line by line, so a
        cut line may be repaired differently). Words that spell more characters than that many
        tokens can (each at most the longest vocabulary entry) are cut there, inside a word: its
        tokens beyond the kept ones are the ones that change."""
        want = 2 * (context_length - 2)
        budget = want * self.longest
        count = want
        while True:
            end, spelled = None, 0
            for n, word in enumerate(_WORD.finditer(text), 1):
                spelled += word.end() - word.start()
                if spelled > budget:
                    return text[:word.end() - (spelled - budget)]
                if n == count:
                    end = word.end()
                    break
            if end is None or len(self.encode(text[:end])) >= want:
                return text if end is None else text[:end]
            count *= 2

    def tokens(self, text, context_length=CONTEXT_LENGTH):
        """[sot] + BPE + [eot], overlong captions keep sot, the first context-2 BPE ids and eot."""
        return [SOT_ID] + self.encode(self.head(text, context_length))[:context_length - 2] + [EOT_ID]

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
def get_tokenizer(bpe_path):
    """One tokenizer per vocabulary file and process (its BPE cache is shared by every caller)."""
    return Tokenizer(bpe_path)


# ----------------------------------------------------------------------------------------------
# MLM masking
# ----------------------------------------------------------------------------------------------

def mask_tokens(tokens, *, generator, prob=0.15, mask_id=MASK_ID, vocab_size=VOCAB_SIZE,
                specials=(MASK_ID, SOT_ID, EOT_ID)):
    """BERT 80/10/10 masking of padded token rows, as the DeCLIP reference does it.

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


def mlm_positions(labels):
    """(flat indices of the masked positions, their target ids) of mask_tokens' labels."""
    flat = labels.flatten()
    index = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    return index, flat[index]


def pad_positions(index, targets, multiple):
    """mlm_positions' output padded to a multiple of `multiple` entries (position 0, target
    IGNORE_INDEX), so the masked-token logits keep one of a few shapes; the loss ignores the pad."""
    pad = -len(index) % multiple
    return (torch.cat([index, index.new_zeros(pad)]),
            torch.cat([targets, targets.new_full((pad,), IGNORE_INDEX)]))


# ----------------------------------------------------------------------------------------------
# Text augmentation (EDA), WordNet without nltk
# ----------------------------------------------------------------------------------------------

STOPWORDS_PATH = ROOT / 'assets' / 'stopwords_en.txt'

# WordNet morphology (morphy): suffix rules per part of speech.
_MORPHY_RULES = {
    'n': [('s', ''), ('ses', 's'), ('ves', 'f'), ('xes', 'x'), ('zes', 'z'), ('ches', 'ch'),
          ('shes', 'sh'), ('men', 'man'), ('ies', 'y')],
    'v': [('s', ''), ('ies', 'y'), ('es', 'e'), ('es', ''), ('ed', 'e'), ('ed', ''), ('ing', 'e'),
          ('ing', '')],
    'a': [('er', ''), ('est', ''), ('er', 'e'), ('est', 'e')],
    'r': [],
}


class EDA:
    """The three EDA operations DeCLIP uses (the textaugment package's semantics, which the reference uses), driven by
    an explicit `random.Random` so workers are reproducible without touching the global RNG."""

    def __init__(self, synonyms_path, stopwords_path=STOPWORDS_PATH, use_synonyms=True):
        self.stopwords = set(Path(stopwords_path).read_text().split())
        self.lemmas, self.exceptions = {}, {}
        if use_synonyms:
            if not Path(synonyms_path).is_file():
                raise FileNotFoundError(
                    f'WordNet synonym table not found at {synonyms_path}: run `python tools/prepare.py setup`, '
                    f'or train without synonym replacement (--config.data.eda_synonyms=False)')
            with gzip.open(synonyms_path, 'rt', encoding='utf-8') as f:
                for line in f:
                    if line.startswith('#'):
                        continue
                    kind, pos, word, rest = line.rstrip('\n').split('\t')
                    target = self.lemmas if kind == 's' else self.exceptions
                    target[(pos, word)] = tuple(rest.split('|')) if rest else ()
        self.ops = ([self.synonym_replacement] if use_synonyms else []) + [self.random_swap, self.random_deletion]

    def _morphy(self, form, pos):
        """Base forms of `form` that WordNet lists for `pos` (nltk's morphy)."""
        def known(forms):
            return list(dict.fromkeys(f for f in forms if (pos, f) in self.lemmas))
        if (pos, form) in self.exceptions:
            return known([form, *self.exceptions[(pos, form)]])
        forms = [form[:-len(old)] + new for old, new in _MORPHY_RULES[pos] if form.endswith(old)]
        found = known([form, *forms])
        while not found and forms:
            forms = [f[:-len(old)] + new for f in forms for old, new in _MORPHY_RULES[pos] if f.endswith(old)]
            found = known(forms)
        return found

    def synonyms(self, word):
        word_l = word.lower()
        out = set()
        for pos in 'nvar':
            for base in self._morphy(word_l, pos):
                out.update(self.lemmas[(pos, base)])
        out.discard(word)
        out.discard('')
        return sorted(out)

    def synonym_replacement(self, words, rng):
        """Replace every occurrence of the first (shuffled, distinct, non-stopword) word that has
        synonyms by one random synonym."""
        candidates = sorted({w for w in words if w not in self.stopwords})
        rng.shuffle(candidates)
        for word in candidates:
            synonyms = self.synonyms(word)
            if synonyms:
                choice = rng.choice(synonyms)
                return [choice if w == word else w for w in words]
        return list(words)

    @staticmethod
    def random_swap(words, rng):
        """Swap two random positions (gives up after 3 draws of the same index)."""
        words = list(words)
        i = rng.randrange(len(words))
        j = i
        for _ in range(3):
            j = rng.randrange(len(words))
            if j != i:
                break
        words[i], words[j] = words[j], words[i]
        return words

    @staticmethod
    def random_deletion(words, rng, p=0.1):
        """Drop each word with probability p; if all are dropped keep one random word."""
        if len(words) == 1:
            return list(words)
        kept = [w for w in words if rng.random() > p]
        return kept if kept else [rng.choice(words)]

    def __call__(self, caption, rng):
        words = caption.split()
        if not words:
            raise ValueError('empty caption')
        return ' '.join(rng.choice(self.ops)(words, rng))


# ----------------------------------------------------------------------------------------------
# Name patterns (data.shards)
# ----------------------------------------------------------------------------------------------

MAX_NAMES = 1_000_000  # names one pattern may expand to


def _brace_choices(body):
    """The alternatives of one {body}: a 'lo..hi[..step]' range (zero-padded to the wider end when
    an end has a leading zero, as the shell does) or an 'a,b' list; None for other text."""
    r = regex.fullmatch(r'(-?(\d+))\.\.(-?(\d+))(?:\.\.-?(\d+))?', body)
    if r is None:
        return body.split(',') if ',' in body else None
    lo, hi, step = int(r[1]), int(r[3]), int(r[5] or 1) or 1
    numbers = range(lo, hi + 1, step) if lo <= hi else range(lo, hi - 1, -step)
    if len(numbers) > MAX_NAMES:
        raise ValueError(f'{{{body}}} makes more than {MAX_NAMES:,} names')
    pad = max(len(r[1]), len(r[3])) if any(len(d) > 1 and d[0] == '0' for d in (r[2], r[4])) else 0
    return [str(n).zfill(pad) for n in numbers]


def split_list(value, *, braces=False):
    """The items of a list, or of a comma-separated string (with `braces`, not at commas inside {...})."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [v for v in regex.split(r',(?![^{}]*\})' if braces else ',', str(value)) if v]


def expand_braces(pattern):
    """The names a shell's brace expansion makes of `pattern`, in order: '{a,b}' lists and
    '{0..1023}' / '{00000..01023}' ranges, several (not nested); other braces stay as written."""
    pieces, last, count = [], 0, 1
    for m in regex.finditer(r'\{([^{}]*)\}', pattern):
        choices = _brace_choices(m[1])
        if choices is not None:
            pieces += [[pattern[last:m.start()]], choices]
            last, count = m.end(), count * len(choices)
    if count > MAX_NAMES:
        raise ValueError(f'{pattern!r} makes more than {MAX_NAMES:,} names')
    return [''.join(p) for p in itertools.product(*pieces, [pattern[last:]])]


# ----------------------------------------------------------------------------------------------
# Zero-shot prompt templates
# ----------------------------------------------------------------------------------------------

PROMPTS = ROOT / 'assets' / 'prompts'


def load_prompts(name):
    """Templates of a prompt set: prompt1/6/8/80 (shipped), 'cc' (bare class name) or file:<path>.
    The class goes where a template has {0} or OpenAI's {}; a template with neither would give
    every class the same text, so it is an error naming file:line."""
    if name == 'cc':
        return ['{0}']
    path = Path(name[5:]) if name.startswith('file:') else PROMPTS / f'{name}.txt'
    if not path.is_file():
        raise FileNotFoundError(f'prompt set {name!r} not found at {path} (known: prompt1, prompt6, '
                                f'prompt8, prompt80, cc, file:<path>)')
    templates = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip().replace('{}', '{0}')
        if line and '{0}' not in line:
            raise ValueError(f'{path}:{n}: template {line!r} has no class placeholder ({{0}} or {{}})')
        templates += [line] if line else []
    return templates


def class_prompts(class_names, templates):
    """Each class's prompt texts. Classes whose texts are all the same cannot be told apart: every
    class alike is an error (a constant classifier); some alike (duplicate names) is a warning."""
    texts = [[t.replace('{0}', name) for t in templates] for name in class_names]
    alike = collections.defaultdict(list)
    for name, ts in zip(class_names, texts):
        alike[tuple(ts)].append(name)
    if len(class_names) > 1 and len(alike) == 1:
        raise ValueError(f'every class gets the same prompt texts ({texts[0][:2]}...): the scores would be constant')
    for names in (n for n in alike.values() if len(n) > 1):
        print(f'warning: classes {names} get the same prompt texts and cannot be told apart', flush=True)
    return texts
