"""MLM masking as batches get it: the random 10 % of selected tokens are uniform over the whole
vocabulary, special ids included (the reference's quirk), and with accumulation each device's
micro-batch is masked from its own stream position, as that device would in a larger job; masks
differ between rows, batches and ranks and repeat for the same stream position."""
import torch

import data
import guard
import seeds
import text

VOCAB, MASK, SOT, EOT = 12, 9, 10, 11   # a small vocabulary whose last three ids are the specials


def test_random_replacements_are_uniform_over_the_whole_vocabulary():
    """Rows of one ordinary id (1) between sot and eot: a selected token that is neither the mask
    id nor 1 is a random replacement, and each of the other ten ids (0, the specials 10 and 11
    included) gets a tenth of them. Breaks it catches: random ids drawn without the specials
    (randint(vocab_size - 3)) or without id 0 (randint(1, vocab_size))."""
    rows = torch.zeros(20_000, 20, dtype=torch.long)
    rows[:, 0], rows[:, 1:18], rows[:, 18] = SOT, 1, EOT
    masked, labels = text.mask_tokens(rows, generator=torch.Generator().manual_seed(0), mask_id=MASK,
                                      vocab_size=VOCAB, specials=(MASK, SOT, EOT))
    selected = labels != text.IGNORE_INDEX
    assert (rows[selected] == 1).all()
    random_ids = masked[selected & (masked != MASK) & (masked != 1)]
    counts = torch.bincount(random_ids, minlength=VOCAB)
    others = [i for i in range(VOCAB) if i not in (1, MASK)]
    assert counts.sum() == counts[others].sum() > 3_000
    share = counts[others].float() / counts.sum()
    assert (share - 0.1).abs().max() < 0.025, share


def captions(n):
    words = 'red green blue circle cross square big small photo drawing'.split()
    return data.tokenize([' '.join(words[(i + j) % 10] for j in range(12)) for i in range(n)])


def collate(tokens, positions, *, micro=None):
    """Collate (seed 3) of samples with these captions at these stream positions."""
    samples = [{'text': t, 'bad': torch.zeros(len(guard.BAD_KINDS), dtype=torch.long),
                'images': torch.zeros(2, 3, 1, 1, dtype=torch.uint8), 'position': p} for t, p in zip(tokens, positions)]
    return data.Collate(mask=True, seed=3, micro=micro)(samples)


def test_each_micro_batch_is_masked_from_its_own_stream_position():
    """A loader batch of 2 micro-batches of 3 (accum_steps 2): rows 0-2 are masked as a batch of
    their own seeded by their first position, rows 3-5 likewise by theirs; the flat MLM positions
    count over the whole batch. Break it catches: every micro-batch seeded by the batch's first
    position (the second device would then draw the first one's stream)."""
    positions = [40, 41, 42, 43, 44, 45]
    tokens = captions(6)
    out = collate(tokens, positions, micro=3)
    parts = [text.mask_tokens(tokens[i:i + 3], generator=seeds.generator(3, positions[i])) for i in (0, 3)]
    want_text = torch.cat([m for m, _ in parts])
    want_index, want_targets = text.mlm_positions(torch.cat([lab for _, lab in parts]))
    assert torch.equal(out['text'], want_text)
    assert torch.equal(out['mlm_index'], want_index) and torch.equal(out['mlm_targets'], want_targets)
    assert (out['mlm_index'] >= 3 * tokens.shape[1]).any()   # the second micro-batch has masked tokens
    # the second micro-batch is the batch a device at stream position 43 masks on its own
    assert torch.equal(out['text'][3:], collate(tokens[3:], positions[3:])['text'])
    assert not torch.equal(collate(tokens, positions)['text'], out['text'])   # one batch of 6 masks otherwise


CAPTION = ' '.join(f'a photo of the {c} {s} on a sandy background'
                   for c in ('red', 'green', 'blue') for s in ('circle', 'cross'))  # 60 BPE tokens


def masked_batch(positions):
    """(masked text, selected positions [B, L]) of Collate for identical captions at these stream positions."""
    tokens = data.tokenize([CAPTION], 77)[0]
    samples = [{'text': tokens.clone(), 'bad': torch.zeros(len(guard.BAD_KINDS), dtype=torch.long),
                'images': torch.zeros(2, 3, 1, 1, dtype=torch.uint8), 'position': p} for p in positions]
    out = data.Collate(mask=True, seed=0)(samples)
    selected = torch.zeros(out['text'].numel(), dtype=torch.bool)
    selected[out['mlm_index']] = True
    assert torch.equal(out['mlm_targets'], tokens.repeat(len(positions))[out['mlm_index']])
    return out['text'], selected.view_as(out['text'])


def stream_positions(rank, step, batch=4, world=2):
    sampler = data.IterationSampler(1000, batch_size=batch, world_size=world, rank=rank, max_iter=step + 1,
                                    seed=0, start_step=step)
    return [position for _, position in sampler]


def test_mlm_masks_differ_across_rows_batches_and_ranks_but_repeat_per_position():
    """MLM masks differ between batch rows, batches and ranks; the same stream position gives the same mask."""
    r0s0, r1s0, r0s1 = stream_positions(0, 0), stream_positions(1, 0), stream_positions(0, 1)
    assert r0s0[0] != r1s0[0] and r0s0[0] != r0s1[0]
    text, mask = masked_batch(r0s0)
    assert mask.any(dim=1).all()
    assert all(not torch.equal(mask[i], mask[j]) for i in range(len(mask)) for j in range(i))   # rows
    assert (masked_batch(r0s1)[1] != mask).any(dim=1).all()                                     # next batch
    assert (masked_batch(r1s0)[1] != mask).any(dim=1).all()                                     # other rank
    again = masked_batch(r0s0)                                                                  # same positions
    assert torch.equal(again[0], text) and torch.equal(again[1], mask)
