"""A megabyte caption costs its head only: it is cut before BPE and EDA, and the tokens kept are unchanged."""
import time

import numpy as np
import torch

import data
import loader
import text
from helpers import data_config, write_jpeg, write_meta


def long_caption(n_chars, seed=0):
    rng = np.random.default_rng(seed)
    words = [''.join(rng.choice(list('abcdefghijklmnopqrstuvwxyz'), rng.integers(2, 9))) for _ in range(3000)]
    out = ' '.join(words[i] for i in rng.integers(0, len(words), n_chars // 4))
    return out[:n_chars]


def test_a_megabyte_caption_costs_its_head_only(tmp_path):
    tok = data.get_tokenizer()
    caption = long_caption(1 << 20)
    head = tok.head(caption, 77)
    assert caption.startswith(head) and len(head) < 5000
    full = [text.SOT_ID] + tok.encode(caption)[:75] + [text.EOT_ID]       # the uncut reference (slow)
    assert tok.tokens(caption) == tok.tokens(head) == full
    # whitespace runs, line breaks and one endless word cannot make the cut remove kept tokens
    for other in (' ' * 300_000 + '\r\n\t' + caption[:20_000], 'x.y/' * 250_000, caption[:3000].replace(' ', '\n')):
        assert tok.tokens(other) == [text.SOT_ID] + tok.encode(other)[:75] + [text.EOT_ID]
    assert tok.head('a short caption', 77) == 'a short caption'
    write_jpeg(tmp_path / 'a.jpg')
    write_meta(tmp_path / 'meta.jsonl', [{'filename': 'a.jpg', 'caption': c} for c in (caption, head)])
    ds = loader.train_dataset(data_config(train_root=str(tmp_path), train_meta=str(tmp_path / 'meta.jsonl')))
    start = time.monotonic()
    big = ds[(0, 7)]
    assert time.monotonic() - start < 2.0                                  # a generous guard (was ~5 s)
    cut = ds[(1, 7)]
    assert torch.equal(big['text'], cut['text']) and torch.equal(big['text_eda'], cut['text_eda'])
    assert (big['text_eda'] != 0).sum() == 77                              # EDA still fills the context
