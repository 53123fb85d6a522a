"""What a training step reports besides its losses: the gradient norm is the norm of the
gradients the optimiser steps with, and the loader's bad-sample counts add up over steps."""
import math

import pytest
import torch

import data
from tiny_step import gradients, keep_gradients, one_thread, step, tiny_state  # noqa: F401  (one_thread: a fixture)

pytestmark = pytest.mark.usefixtures('one_thread')


def test_grad_norm_is_the_norm_of_the_step_gradients():
    """metrics['grad_norm'] = sqrt(sum of every squared gradient entry), from the gradients left
    in .grad (the optimiser kept from stepping and clearing them). Breaks it catches: the norm of
    the parameters instead of their gradients, of one tower only."""
    cfg, state, batch = tiny_state(batch=4)
    keep_gradients(state)
    metrics = step(state, batch, cfg)
    grads = gradients(state)
    assert any(k.startswith('visual.') for k in grads) and any(k.startswith('encode_text.') for k in grads)
    want = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    assert float(metrics['grad_norm']) == pytest.approx(want, rel=1e-5)


def test_bad_sample_counts_add_up_over_steps():
    """Each batch's per-kind counts of replaced samples are added to state.bad_totals. Break it
    catches: the totals set to the last batch's counts."""
    cfg, state, batch = tiny_state(batch=4)
    counts = [torch.arange(len(data.BAD_KINDS)), torch.ones(len(data.BAD_KINDS), dtype=torch.long)]
    for c in counts:
        step(state, dict(batch, bad=c), cfg)
    assert state.bad_totals.tolist() == (counts[0] + counts[1]).tolist()
