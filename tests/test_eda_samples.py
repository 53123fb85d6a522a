"""data.eda and data.eda_synonyms in the samples a loader builds: the EDA caption is one of the
three operations applied to the caption (synonym replacement only where eda_synonyms is on, and
never of a stopword), and without eda a sample has no second caption."""
import io
import random

import pytest

import data
import text
from helpers import data_config, write_jpeg

CAPTION = 'a small dog runs across the green field near a big old house'


@pytest.fixture(scope='module')
def image():
    buf = io.BytesIO()
    write_jpeg(buf)
    return buf.getvalue()


def eda_captions(image, n=60, **cfg):
    """The decoded EDA captions of n samples of CAPTION (one per sample seed), as word lists."""
    builder = data.SampleBuilder(data_config(**cfg))
    tok = data.get_tokenizer()
    return [tok.decode(builder(CAPTION, image, random.Random(seed))['text_eda']).split() for seed in range(n)]


def swap_or_deletion(words, caption):
    """Whether `words` is `caption` with two words swapped (or a swap that drew one index three
    times: unchanged) or with some words deleted, keeping the order."""
    if len(words) == len(caption):
        return sorted(words) == sorted(caption) and sum(a != b for a, b in zip(words, caption)) in (0, 2)
    rest = iter(caption)
    return 0 < len(words) < len(caption) and all(w in rest for w in words)


def test_without_synonyms_the_eda_caption_only_swaps_or_deletes(image):
    """eda_synonyms=False: every EDA caption is a swap or a deletion of the caption, and they are
    not all the caption itself. Break it catches: SampleBuilder building EDA with synonym
    replacement whatever data.eda_synonyms says."""
    caption = CAPTION.split()
    found = eda_captions(image, eda_synonyms=False)
    assert [words for words in found if not swap_or_deletion(words, caption)] == []
    assert sum(words != caption for words in found) > 30


def test_with_synonyms_some_words_are_replaced(image):
    """eda_synonyms=True: about a third of the EDA captions (one of three operations) bring a word
    the caption does not have, every other one is a swap or a deletion."""
    caption = CAPTION.split()
    found = eda_captions(image, eda_synonyms=True)
    new = [words for words in found if not swap_or_deletion(words, caption)]
    assert 8 <= len(new) <= 35 and all(set(words) - set(caption) for words in new)


def test_without_eda_a_sample_has_one_caption(image):
    """Break it catches: SampleBuilder making an EDA caption whatever data.eda says."""
    sample = data.SampleBuilder(data_config(eda=False))(CAPTION, image, random.Random(0))
    assert 'text_eda' not in sample and sample['images'].shape[0] == 2
    assert data.get_tokenizer().decode(sample['text']) == CAPTION


def test_synonym_replacement_never_replaces_a_stopword():
    """EDA synonym replacement keeps every stopword, even stopwords that have WordNet synonyms."""
    eda = text.EDA(data.SYNONYMS_PATH)
    words = 'the cat jumped over the wall and ran out up the hill once very fast'.split()
    stop = [i for i, w in enumerate(words) if w in eda.stopwords]
    assert {'over', 'out', 'up', 'once', 'very'} <= {words[i] for i in stop}
    assert all(eda.synonyms(w) for w in ('over', 'out', 'up', 'once', 'very'))   # they could be replaced
    changed = 0
    for seed in range(300):
        out = eda.synonym_replacement(words, random.Random(seed))
        assert len(out) == len(words)
        assert [out[i] for i in stop] == [words[i] for i in stop], seed
        changed += out != words
    assert changed == 300
