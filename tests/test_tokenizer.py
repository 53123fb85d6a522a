"""The BPE tokenizer: known vectors, specials never from caption text, batches and truncation, decoding, its file."""
import pytest
import torch

import data
import text

KNOWN = {
    'a photo of a cat.': [320, 1125, 539, 320, 2368, 269],
    'A Photo Of  a CAT!!': [320, 1125, 539, 320, 2368, 748],
    'naïve café – “quotes” &amp; emoji 🐶': [1097, 35689, 563, 15304, 1224, 257, 5808, 257, 261, 16327, 10631],
    'yfcc_12345 DSC0001.JPG': [88, 21240, 318, 272, 273, 274, 275, 276, 37240, 271, 271, 271, 272, 269, 36950],
}


@pytest.fixture(scope='module')
def tok():
    return data.get_tokenizer()


@pytest.mark.parametrize('caption', list(KNOWN))
def test_known_vectors(tok, caption):
    assert tok.encode(caption) == KNOWN[caption]
    row = data.tokenize([caption])[0].tolist()
    n = len(KNOWN[caption])
    assert row[:n + 2] == [text.SOT_ID] + KNOWN[caption] + [text.EOT_ID]
    assert row[n + 2:] == [0] * (77 - n - 2)


def test_specials_and_vocab(tok):
    assert len(tok.decoder) == text.VOCAB_SIZE == 49409
    assert tok.encoder['<|mask|>'] == text.MASK_ID == 49406
    assert tok.encoder['<|startoftext|>'] == text.SOT_ID == 49407
    assert tok.encoder['<|endoftext|>'] == text.EOT_ID == 49408
    assert len(tok.ranks) == 48894


def test_batch_dtype_shape_and_truncation(tok):
    long = ' '.join(['cat'] * 200)
    out = data.tokenize(['a photo of a cat.', long])
    assert out.dtype == torch.int64 and out.shape == (2, 77)
    assert out[1, 0] == text.SOT_ID and out[1, 76] == text.EOT_ID
    assert out[1, 1:76].tolist() == tok.encode(long)[:75]
    assert out[1].argmax() == 76
    short = data.tokenize(['a b'], context_length=5)[0].tolist()
    assert short == [text.SOT_ID] + tok.encode('a b') + [text.EOT_ID, 0]


def test_decode_round_trip(tok):
    for caption in ['a photo of a red circle next to a blue square.', 'naïve café 🐶', 'x <| mask |> y']:
        ids = data.tokenize([caption])[0]
        assert tok.decode(ids).replace(' .', '.') == text._clean(caption)


def test_missing_vocabulary_message(tmp_path):
    with pytest.raises(FileNotFoundError, match='prepare.py setup'):
        data.Tokenizer(tmp_path / 'nope.txt.gz')


@pytest.mark.parametrize('special', ['<|mask|>', '<|startoftext|>', '<|endoftext|>', '<|MASK|>'])
def test_special_tokens_never_come_from_caption_text(tok, special):
    """Caption text is BPE text only: a literal special-token string gives its byte-pair pieces
    ('<|', the word, '|>', the reference's split for <|mask|>), so no caption can move the eot
    (pooling) position or hide tokens from MLM; sot, eot and mask ids come from the code alone."""
    word = special[2:-2].lower()
    caption = f'a {special} b.{special}'
    want = (tok.encode('a') + tok.encode('<|') + tok.encode(word) + tok.encode('|>') + tok.encode('b')
            + tok.encode('.<|') + tok.encode(word) + tok.encode('|>'))
    assert tok.encode(caption) == want
    assert not {text.MASK_ID, text.SOT_ID, text.EOT_ID} & set(want)
    row = data.tokenize([caption])[0]
    n = len(want) + 2
    assert row.tolist()[:n] == [text.SOT_ID] + want + [text.EOT_ID] and int(row.argmax()) == n - 1
    assert tok.decode(row) == f'a <| {word} |> b .<| {word} |>'
