"""The optimiser a run builds from config.optim: two AdamW steps of every parameter against the
closed form with the configured lr, betas, eps and weight decay, decay applied (decoupled) to
all but the reference's exempt parameters. Values unlike torch's defaults and the reference's, so
a key that is ignored shows. The parameter groups of the full models against the reference's rule."""
import pytest
import torch

import declip
import trainstep
from configs import r50, vitb32
from helpers import tiny_config
from tiny_step import one_thread  # noqa: F401  (a fixture)

OPTIM = dict(base_lr=0.05, weight_decay=0.3, beta1=0.5, beta2=0.7, eps=1e-3)


def exempt(name):
    """The reference's zero-decay group by name: every bias of a Linear / Conv / norm
    layer (not the attention's in_proj_bias), LayerNorm and BatchNorm weights, logit_scale."""
    leaf = name.split('.')[-2] if '.' in name else ''
    return (name == 'logit_scale' or (name.endswith('.bias') and not name.endswith('in_proj_bias'))
            or (name.endswith('.weight') and leaf.startswith(('ln', 'bn'))))


def adamw(p, grads, *, lr, wd, beta1, beta2, eps):
    """torch.optim.AdamW's update (decoupled decay, bias-corrected moments) in float64."""
    p, m, v = p.double(), torch.zeros_like(p, dtype=torch.float64), torch.zeros_like(p, dtype=torch.float64)
    for t, g in enumerate(grads, 1):
        g = g.double()
        p = p * (1 - lr * wd)
        m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
        p = p - lr * (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + eps)
    return p


@pytest.mark.usefixtures('one_thread')
def test_two_adamw_steps_follow_the_configured_hyper_parameters():
    """Breaks it catches: weight_decay, betas or eps not taken from config.optim (torch's
    defaults or the reference's values instead), beta2 given beta1's value, decay applied to an
    exempt parameter (logit_scale, a bias, a norm weight) or missing from a decayed one. The
    frozen patch embedding has no group and stays as it was."""
    cfg = tiny_config()
    cfg.optim.update(OPTIM)
    torch.manual_seed(0)
    model = declip.build_model(cfg.model)
    optimizer = trainstep.build_optimizer(model, cfg.optim, 'cpu')
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    grads = {k: [1e-3 * torch.randn(p.shape, generator=g) for _ in range(2)]    # |g| ~ eps: eps matters
             for k, p in model.named_parameters() if p.requires_grad}
    for t in range(2):
        for k, p in model.named_parameters():
            if k in grads:
                p.grad = grads[k][t].clone()
        optimizer.step()
    assert not model.visual.conv1.weight.requires_grad
    assert torch.equal(model.visual.conv1.weight, before['visual.conv1.weight'])
    assert {exempt(k) for k in grads} == {True, False} and exempt('logit_scale')
    hyper = dict(lr=OPTIM['base_lr'], beta1=OPTIM['beta1'], beta2=OPTIM['beta2'], eps=OPTIM['eps'])
    for k, p in model.named_parameters():
        if k in grads:
            want = adamw(before[k], grads[k], wd=0.0 if exempt(k) else OPTIM['weight_decay'], **hyper)
            torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-7, msg=k)


def test_adamw_closed_form_is_torchs():
    """The reference formula above is torch's AdamW (non-fused, float64), so the test above checks
    the configuration, not a formula of its own."""
    g = torch.Generator().manual_seed(2)
    p = torch.randn(50, generator=g, dtype=torch.float64)
    grads = [1e-3 * torch.randn(50, generator=g, dtype=torch.float64) for _ in range(3)]
    param = torch.nn.Parameter(p.clone())
    opt = torch.optim.AdamW([param], lr=0.05, betas=(0.5, 0.7), eps=1e-3, weight_decay=0.3)
    for grad in grads:
        param.grad = grad.clone()
        opt.step()
    want = adamw(p, grads, lr=0.05, wd=0.3, beta1=0.5, beta2=0.7, eps=1e-3)
    torch.testing.assert_close(param.detach(), want, rtol=1e-12, atol=1e-15)


def spec_no_decay(name):
    """The reference's param_group_all, by name: biases of Linear/Conv/BN/LN, BN and LN weights, logit_scale."""
    if name == 'logit_scale':
        return True
    if name.endswith('.bias') and not name.endswith('in_proj_bias'):
        return True
    leaf = name.split('.')[-2]
    return name.endswith('.weight') and (leaf.startswith(('ln', 'bn')) or leaf in ('1',) and 'downsample' in name)


@pytest.mark.parametrize('config', [vitb32, r50])
def test_parameter_groups_follow_the_spec(config):
    with torch.device('meta'):
        model = declip.build_model(config.get_config().model)
    decay, no_decay = trainstep.param_groups(model, 0.1)
    assert decay['weight_decay'] == 0.1 and no_decay['weight_decay'] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)]: False for p in decay['params']} | {names[id(p)]: True for p in no_decay['params']}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == trainable
    for name, flag in got.items():
        assert flag == spec_no_decay(name), name
    for name in ('encode_text.token_embedding.weight', 'encode_text.positional_embedding',
                 'encode_text.transformer.resblocks.0.attn.in_proj_bias'):
        assert got[name] is False
