"""The logit-scale parameter is clamped into [3, 6] after the optimiser step too (the reference's
logit_scale_param_value clip), not only before it: an AdamW step that would carry it out of the
range leaves it on the bound."""
import pytest
import torch

import losses
from tiny_step import one_thread, step, tiny_state  # noqa: F401  (one_thread: a fixture)


@pytest.mark.usefixtures('one_thread')
@pytest.mark.parametrize('start, push, bound', [(2.0, 1.0, 3.0), (10.0, -1.0, 6.0)])
def test_a_step_that_would_leave_the_range_ends_on_the_bound(monkeypatch, start, push, bound):
    """A loss with push * 1000 * scale added makes the logit-scale gradient's sign `push`; at lr
    0.5 AdamW's first step moves the parameter by 0.5 against it, from the bound it was clamped
    to before the step (3 from 2, 6 from 10) outwards, to 2.5 or 6.5; after the step it is on the
    bound again. Break it catches: the clamp after the optimiser step left out."""
    cfg, state, batch = tiny_state(batch=4)
    cfg.optim.update(dict(base_lr=0.5, warmup_lr=0.5))      # lr_at(1) = 0.5
    with torch.no_grad():
        state.model.logit_scale.fill_(start)
    real = losses.declip_loss

    def pushed(features, **kwargs):
        total, terms, keys = real(features, **kwargs)
        return total + push * 1000 * features['logit_scale'].sum(), terms, keys
    monkeypatch.setattr(losses, 'declip_loss', pushed)
    step(state, batch, cfg)
    (moment,) = [s['exp_avg'] for p, s in state.optimizer.state.items() if p is state.model.logit_scale]
    assert torch.sign(moment).item() == push                  # the gradient pushed outwards
    assert state.model.logit_scale.item() == bound
