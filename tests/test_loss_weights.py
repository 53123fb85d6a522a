"""config.loss weights in a training step: the logged total and the gradient are those of
sum_k w_k * term_k, each term weighted by its own key, and a term whose weight is 0 is neither
computed nor back-propagated. The reference's weights (0.4 / 0.2 / 0.2 / 0.2) repeat 0.2, so a step
that swapped the SimSiam, MLM and NN weights would train the same; these weights are distinct.
Both step variants (one pass, accumulated micro-batches) are checked, and a new term added where the
objective's terms are defined reaches both."""
import pytest
import torch

import accum
import losses
import trainstep
from tiny_step import one_thread  # noqa: F401  (a fixture)
from tiny_step import gradients, keep_gradients, single_thread, step, tiny_state

WEIGHTS = dict(clip=0.7, simsiam=0.3, mlm=0.11, nn=0.05)
HEADS = {'simsiam': ('projector.', 'predictor.'), 'mlm': ('text_label_predictor.',)}   # only their term reaches them


def one_step(weights, accum_steps=1):
    """(logged losses, gradients) of the first step of a fresh tiny state with these weights: the
    same initial weights, batch, colour ops and NN queue whatever the weights."""
    cfg, state, batch = tiny_state(batch=4, accum_steps=accum_steps, **weights)
    keep_gradients(state)
    metrics = step(state, batch, cfg)
    return {k: float(v) for k, v in metrics['loss'].items()}, gradients(state)


@pytest.fixture(scope='module', params=[1, 2], ids=['one_pass', 'accumulated'])
def alone(request):
    """{term: one_step with that term alone at weight 1, the others 0}, with accum_steps 1 or 2
    (where SimSiam or MLM alone leave GradCache no contrastive term, and NN alone no gradient for
    the caption features)."""
    with single_thread():
        return {k: one_step({j: float(j == k) for j in WEIGHTS}, request.param) for k in WEIGHTS}


@pytest.fixture(scope='module', params=[1, 2], ids=['one_pass', 'accumulated'])
def shifted(request):
    """{'base': one_step(WEIGHTS), term: one_step(WEIGHTS with that term's weight + 1)} with
    accum_steps 1 or 2 (where the backward is not the logged total's but GradCache's surrogate)."""
    with single_thread():
        out = {'base': one_step(WEIGHTS, request.param)}
        for k in WEIGHTS:
            out[k] = one_step(dict(WEIGHTS, **{k: WEIGHTS[k] + 1}), request.param)
    return out


def test_logged_total_is_the_weighted_sum_of_the_terms(shifted):
    """Breaks it catches: two weights swapped (loss_weights or declip_loss reading another term's
    key), the total summed without weights."""
    logged, _ = shifted['base']
    assert logged.keys() == {'total', *WEIGHTS}
    assert logged['total'] == pytest.approx(sum(w * logged[k] for k, w in WEIGHTS.items()), rel=1e-6)
    for k in WEIGHTS:   # each term is the same number whatever the weights
        assert shifted[k][0][k] == pytest.approx(logged[k], rel=1e-6, abs=1e-7), k


def test_a_term_of_weight_zero_is_not_computed_and_its_head_gets_no_gradient(alone):
    """Each term alone: the log holds only that term, the total is it, and the SimSiam and MLM
    heads have a gradient only in their own term's run. Break it catches: a term computed at
    weight 0 (device_terms testing only for the MLM logits)."""
    for k in WEIGHTS:
        logged, grads = alone[k]
        assert logged.keys() == {'total', k}, k
        assert logged['total'] == pytest.approx(logged[k], rel=1e-6)
        for term, prefixes in HEADS.items():
            assert any(name.startswith(prefixes) for name in grads) == (term == k), (k, term)


def test_the_step_gradient_is_the_weighted_sum_of_each_terms_gradient(shifted):
    """Raising w_k by 1 adds grad(term_k), so grad(W) = sum_k w_k (grad(W + e_k) - grad(W)) for
    every parameter, to fp32 rounding (atol from the largest gradient: the biases of Linear layers
    that feed a BatchNorm have gradient 0 up to rounding). Breaks it catches: a weight missing or
    swapped in what is back-propagated but not in what is logged (GradCache's surrogate)."""
    _, base = shifted['base']
    atol = 1e-5 * max(g.abs().max().item() for g in base.values())
    for name, g in base.items():
        want = sum(w * (shifted[k][1][name] - g) for k, w in WEIGHTS.items())
        torch.testing.assert_close(g, want, rtol=1e-4, atol=atol, msg=name)


def test_accumulated_simsiam_and_mlm_alone_are_the_mean_of_the_micro_batches(one_thread):
    """clip = nn = 0 (SimSiam + MLM only) with accum_steps 2, where GradCache has no contrastive
    term to pass back: the logged terms are micro-batch 0's and the gradient is the mean of each
    micro-batch's SimSiam + MLM gradient, both computed here from a plain forward of each micro-
    batch as virtual device j (its colour-op stream). Break it catches: the step crashing on the
    empty contrastive sum ('int' object has no attribute 'backward')."""
    weights = dict(clip=0.0, nn=0.0, simsiam=1.0, mlm=1.0)
    cfg, state, batch = tiny_state(batch=4, accum_steps=2, **weights)
    keep_gradients(state)
    logged = {k: float(v) for k, v in step(state, batch, cfg)['loss'].items()}
    _, ref, _ = tiny_state(batch=4, accum_steps=2, **weights)     # the same initial weights
    want = []
    for j, part in enumerate(accum.micro_batches(batch, 2)):
        inputs = trainstep.step_inputs(ref, part, cfg=cfg, rank=j, world=2)
        out = ref.model(inputs['views'], inputs['text'], text_eda=inputs['text_eda'], mlm_index=inputs['mlm_index'])
        terms = {'simsiam': losses.simsiam_loss(p=out['p'], z=out['z']),
                 'mlm': losses.mlm_loss(logits=out['mlm_logits'], targets=inputs['mlm_targets'])}
        ((terms['simsiam'] + terms['mlm']) / 2).backward()
        want.append({k: float(v.detach()) for k, v in terms.items()})
    assert logged == pytest.approx(dict(want[0], total=want[0]['simsiam'] + want[0]['mlm']), rel=1e-6)
    got, expected = gradients(state), gradients(ref)
    assert got.keys() == expected.keys() and all(any(n.startswith(p) for n in got) for p in sum(HEADS.values(), ()))
    atol = 1e-6 * max(g.abs().max().item() for g in expected.values())
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=atol, msg=name)


TOY = 0.4


def add_toy_term(monkeypatch):
    """A new term where a researcher adds one: losses.device_terms gives 'toy' (the mean squared
    caption feature) when config.loss.toy weights it, and 'toy' joins the weighted terms."""
    real = losses.device_terms

    def device_terms(features, *, mlm_targets, weights):
        terms = real(features, mlm_targets=mlm_targets, weights=weights)
        if weights.get('toy', 0):
            terms['toy'] = losses.upcast(features['text']).square().mean()
        return terms
    monkeypatch.setattr(losses, 'device_terms', device_terms)
    monkeypatch.setattr(trainstep, 'LOSS_TERMS', trainstep.LOSS_TERMS + ('toy',))


@pytest.mark.parametrize('accum_steps', [1, 2], ids=['one_pass', 'accumulated'])
def test_a_new_term_reaches_both_steps_total_and_gradient(monkeypatch, one_thread, accum_steps):
    """With the toy term added in the one place the objective's terms are defined, both step
    variants log it, add it to the total with its weight, and back-propagate it: the gradient is
    the base objective's plus TOY x the toy term's alone. Break it catches: a step variant that
    sums or back-propagates its own copy of the objective."""
    add_toy_term(monkeypatch)
    base = one_step(dict(WEIGHTS, toy=0.0), accum_steps)
    logged, grads = one_step(dict(WEIGHTS, toy=TOY), accum_steps)
    toy_logged, toy_grads = one_step(dict(dict.fromkeys(WEIGHTS, 0.0), toy=1.0), accum_steps)
    assert logged.keys() == {'total', 'toy', *WEIGHTS} and base[0].keys() == {'total', *WEIGHTS}
    assert logged['total'] == pytest.approx(sum(w * logged[k] for k, w in dict(WEIGHTS, toy=TOY).items()), rel=1e-6)
    assert toy_logged == pytest.approx({'total': logged['toy'], 'toy': logged['toy']}, rel=1e-6)
    assert any(name.startswith('encode_text.') for name in toy_grads)
    atol = 1e-5 * max(g.abs().max().item() for g in grads.values())
    for name, g in grads.items():
        want = base[1][name] + TOY * toy_grads.get(name, torch.zeros_like(g))
        torch.testing.assert_close(g, want, rtol=1e-4, atol=atol, msg=name)
