"""text.mask_tokens: 15 % of ordinary tokens selected (80 % masked, 10 % random, 10 % kept), never a special."""
import torch

import text


def _rows(n, seed=0):
    """Random caption rows: sot, 5..40 ordinary ids, eot, zero padding."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.zeros(n, 48, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(5, 41, (1,), generator=g))
        rows[i, 0] = text.SOT_ID
        rows[i, 1:1 + length] = torch.randint(1, 49000, (length,), generator=g)
        rows[i, 1 + length] = text.EOT_ID
    return rows


def test_statistics_and_invariants():
    rows = _rows(6000)
    candidates = (rows > 0) & (rows < text.MASK_ID)
    candidates[:, 0] = False
    masked, labels = text.mask_tokens(rows, generator=torch.Generator().manual_seed(1))
    n_cand = int(candidates.sum())
    assert n_cand > 100_000
    selected = labels != text.IGNORE_INDEX
    assert not (selected & ~candidates).any()          # specials and padding never selected
    assert (labels[selected] == rows[selected]).all()
    assert (masked[~selected] == rows[~selected]).all()
    rate = selected.sum().item() / n_cand
    assert abs(rate - 0.15) < 0.005
    n_sel = selected.sum().item()
    to_mask = (masked[selected] == text.MASK_ID).sum().item() / n_sel
    unchanged = (masked[selected] == rows[selected]).sum().item() / n_sel
    assert abs(to_mask - 0.8) < 0.015
    assert abs(unchanged - 0.1) < 0.015
    assert abs(1 - to_mask - unchanged - 0.1) < 0.015   # random replacements (rarely equal to the original)
    # random ids range over the whole vocabulary, specials included
    rand = masked[selected & (masked != text.MASK_ID) & (masked != rows)]
    assert rand.max() > 45_000 and rand.min() < 5_000


def test_deterministic_for_a_generator():
    rows = _rows(50, seed=3)
    a = text.mask_tokens(rows, generator=torch.Generator().manual_seed(7))
    b = text.mask_tokens(rows, generator=torch.Generator().manual_seed(7))
    c = text.mask_tokens(rows, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
