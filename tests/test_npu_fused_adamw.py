"""torch_npu's fused AdamW on a 910 with fp16, on the CPU: which runs choose it, that its state in
torch's layout is torch.optim.AdamW's after the same steps, that a checkpoint moves between it and
torch's AdamW in both directions, and that a skipped step changes nothing. torch_npu is replaced by
FusedAdamW below (its behaviour as torch_npu's sources have it) and torch's CPU GradScaler stands
in for torch_npu's: both check the gradients and skip the optimiser step on the host."""
import math
import sys
import types

import pytest
import torch
from torch.optim import optimizer as torch_optimizer

import checkpoints
import declip
import runtime
import trainstep
from helpers import tiny_config
from tiny_step import nonfinite_at, one_thread, step, tiny_state  # noqa: F401  (one_thread: a fixture)

pytestmark = pytest.mark.usefixtures('one_thread')

MOMENTS = ('exp_avg', 'exp_avg_sq')


def assert_close(got, want, rel=1e-6, msg=None):
    """fp32 agreement to `rel` of each value and of the tensor's largest value (m = b1 m + (1 - b1) g
    as torch_npu computes it and torch's lerp round apart where m is near 0)."""
    got, want = got.detach().cpu(), want.detach().cpu()
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * float(want.abs().max()), msg=msg)


def _combine(tensors):
    """(one buffer holding `tensors`' values, a view of it shaped like each)."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    ends = torch.tensor([t.numel() for t in tensors]).cumsum(0).tolist()
    return flat, [flat[end - t.numel():end].view_as(t) for t, end in zip(tensors, ends)]


class FusedAdamW(torch.optim.Optimizer):
    """torch_npu.optim.NpuFusedAdamW as torch_npu/optim/npu_fused_adamw.py and
    npu_fused_optim_base.py define it (Ascend/pytorch master 9e73e708ab93; the same code in
    v2.6.0-7.3.0, 0db038ca42a9), on the CPU:
    - arguments lr, betas, eps, weight_decay, amsgrad only; its groups hold just those;
    - its first step moves the parameters, gradients and moments of the parameters that have a
      gradient into combined buffers (torch_npu combines parameters and gradients already at a
      first zero_grad or GradScaler.unscale_): each .data, .grad and state tensor becomes a view
      of its piece, so gradients are zeroed in place (zero_grad(set_to_none=True) raises) and a
      state loaded later is not the one it steps;
    - self.state[p]: {'step': int, 'exp_avg', 'exp_avg_sq'}; the bias corrections use one count
      per group, its first parameter's at the combination, counted on from there;
    - update: p *= 1 - lr wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
      p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps) (torch.optim.AdamW's);
    - is_fused_optimizer = True: what torch_npu's GradScaler looks for.
    `calls` counts the calls of step (for the tests)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad))
        self.is_fused_optimizer, self.is_states_combined, self.grads = True, False, None
        self.steps, self.calls = [], 0

    def _with_grad(self, group):
        return [p for p in group['params'] if p.grad is not None]

    def _combine_all(self):
        params = [p for group in self.param_groups for p in self._with_grad(group)]
        self.grads, grads = _combine([p.grad for p in params])
        for p, data, grad in zip(params, _combine(params)[1], grads):
            p.data, p.grad = data, grad
            self.state[p].setdefault('step', 0)
        for name in MOMENTS:
            for p, moment in zip(params, _combine([self.state[p].get(name, torch.zeros_like(p)) for p in params])[1]):
                self.state[p][name] = moment
        self.steps = [self.state[ps[0]]['step'] if ps else 0 for ps in map(self._with_grad, self.param_groups)]
        self.is_states_combined = True

    @torch.no_grad()
    def step(self):
        self.calls += 1
        if not self.is_states_combined:
            self._combine_all()
        for i, group in enumerate(self.param_groups):
            params = self._with_grad(group)
            self.steps[i] += bool(params)
            (b1, b2), t, lr = group['betas'], self.steps[i], group['lr']
            for p in params:
                state = self.state[p]
                state['step'] += 1
                m, v = state['exp_avg'], state['exp_avg_sq']
                p.mul_(1 - lr * group['weight_decay'])
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                p.addcdiv_(m, (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(group['eps']), value=-lr / (1 - b1 ** t))

    def zero_grad(self, set_to_none=False):
        if set_to_none:
            raise ValueError('set_to_none is not supported in fused optimizers')
        if self.grads is None:
            super().zero_grad(set_to_none=False)
        else:
            self.grads.zero_()


@pytest.fixture
def npu_910(monkeypatch):
    """torch_npu as a 910 shows it to build_optimizer: NpuFusedAdamW in torch_npu.optim, and torch's
    foreach device list as torch_npu's patch gives it there (torch_npu/utils/_optim.py: the NPU is
    listed only for 910B and 910_93 names)."""
    package, optim = types.ModuleType('torch_npu'), types.ModuleType('torch_npu.optim')
    optim.NpuFusedAdamW, package.optim = FusedAdamW, optim
    monkeypatch.setitem(sys.modules, 'torch_npu', package)
    monkeypatch.setitem(sys.modules, 'torch_npu.optim', optim)
    monkeypatch.setattr(torch_optimizer, '_get_foreach_kernels_supported_devices', lambda: ['cuda', 'xpu'])


# ---------------------------------------------------------------- which runs use it


@pytest.mark.parametrize('device_type, fp16, foreach, want', [
    ('npu', True, ['cuda', 'xpu'], True),             # 910, fp16 (precision auto there)
    ('npu', False, ['cuda', 'xpu'], False),           # 910, fp32: no scaler to decide the skip
    ('npu', True, ['cuda', 'xpu', 'npu'], False),     # 910B (or later) with foreach, explicit fp16
    ('cuda', True, ['cuda', 'xpu'], False),
    ('cpu', True, ['cuda', 'xpu'], False),
])
def test_the_fused_npu_adamw_is_chosen_on_a_910_with_fp16_only(device_type, fp16, foreach, want):
    assert runtime.npu_fused_adamw_wanted(device_type, fp16, foreach) is want


def test_build_optimizer_gives_the_910_fp16_run_the_fused_adamw_over_the_same_groups(npu_910, monkeypatch):
    """The reference's groups and hyper-parameters reach it; every other run keeps torch's AdamW
    (fused on CUDA and CPU)."""
    cfg = tiny_config()
    model = declip.build_model(cfg.model)
    fused = trainstep.build_optimizer(model, cfg.optim, 'npu', use_scaler=True)
    want = torch.optim.AdamW(trainstep.param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.base_lr,
                             betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    assert type(fused) is FusedAdamW
    assert [g['weight_decay'] for g in fused.param_groups] == [0.1, 0.0]
    for got, ref in zip(fused.param_groups, want.param_groups):
        assert {k: got[k] for k in runtime.ADAMW_HYPER} == {k: ref[k] for k in runtime.ADAMW_HYPER}
        assert got['betas'] == (0.9, 0.98) and got['eps'] == 1e-8
        assert [id(p) for p in got['params']] == [id(p) for p in ref['params']]
    for device_type, fp16, fused_flag in (('npu', False, False), ('cuda', True, True), ('cpu', True, True)):
        other = trainstep.build_optimizer(model, cfg.optim, device_type, use_scaler=fp16)
        assert type(other) is torch.optim.AdamW and bool(other.defaults['fused']) is fused_flag
    monkeypatch.setattr(torch_optimizer, '_get_foreach_kernels_supported_devices', lambda: ['cuda', 'xpu', 'npu'])
    assert type(trainstep.build_optimizer(model, cfg.optim, 'npu', use_scaler=True)) is torch.optim.AdamW


# ---------------------------------------------------------------- its state in torch's layout


def test_its_state_in_torchs_layout_is_torch_adamws_after_the_same_steps(npu_910):
    """Three steps of both on the same gradients (the reference's betas, eps and decay, its peak
    lr): the converted state has torch's step counts (float32 tensors), moments and group
    hyper-parameters and keys; the weights agree too. Breaks caught: the int step kept (torch's
    AdamW then never counts on), moments saved as views, groups missing torch's keys."""
    cfg = tiny_config()
    cfg.optim.base_lr = 1e-3
    models = [declip.build_model(cfg.model) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = trainstep.build_optimizer(models[0], cfg.optim, 'npu', use_scaler=True)
    ref = trainstep.build_optimizer(models[1], cfg.optim, 'cpu')
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for a, b in zip(*(m.parameters() for m in models)):
            if a.requires_grad:
                grad = 1e-3 * torch.randn(a.shape, generator=g)
                a.grad = grad.clone() if a.grad is None else a.grad.copy_(grad)
                b.grad = grad.clone()
        fused.step()
        ref.step()
    got, want = fused.state_dict(), ref.state_dict()
    assert all(type(s['step']) is int for s in fused.state.values())          # its own layout is unchanged
    assert got['state'].keys() == want['state'].keys() and len(got['state']) > 50
    for i, w in want['state'].items():
        assert got['state'][i].keys() == w.keys()
        assert got['state'][i]['step'].dtype == torch.float32 and float(got['state'][i]['step']) == float(w['step']) == 3
        for name in MOMENTS:
            assert_close(got['state'][i][name], w[name])
    for g_got, g_want in zip(got['param_groups'], want['param_groups']):    # torch's defaults but `fused`
        assert g_got.keys() == g_want.keys() and g_got['fused'] is None and g_want['fused'] is True
        assert {k: v for k, v in g_got.items() if k != 'fused'} == {k: v for k, v in g_want.items() if k != 'fused'}
    for a, b in zip(*(m.parameters() for m in models)):
        assert_close(a, b)
    combined = {s[n].untyped_storage().data_ptr() for s in fused.state.values() for n in MOMENTS}
    assert not combined & {s[n].untyped_storage().data_ptr() for s in got['state'].values() for n in MOMENTS}


# ---------------------------------------------------------------- checkpoints across device kinds


def _run(kind):
    """(config, TrainState, batch) of the tiny DeCLIP, fp32 forwards: 'cpu' as build_state makes it
    (torch's fused AdamW, no scaler); 'npu' with the fused AdamW and an enabled GradScaler."""
    cfg, state, batch = tiny_state(batch=4)
    if kind == 'npu':
        state.optimizer = trainstep.build_optimizer(state.model, cfg.optim, 'npu', use_scaler=True)
        state.scaler = torch.amp.GradScaler('cpu')
    return cfg, state, batch


def _weights(state):
    return {k: p.detach().clone() for k, p in state.model.named_parameters()}


def _fixed_step(state, t):
    """trainstep.update (the skip rule, the scaler, the optimiser step, gradients cleared) on
    gradients fixed by t, scaled by the scaler's power-of-two scale as a backward of the scaled
    loss leaves them: every kind of run sees the same unscaled gradients. (A real step's
    gradients are rounding noise for some parameters, e.g. the attention's key bias, whose updates
    then differ between any two arithmetics by up to the learning rate.)"""
    scale = float(state.scaler.scale(torch.ones(())))
    g = torch.Generator().manual_seed(t)
    for p in state.model.parameters():
        if p.requires_grad:
            grad = 1e-3 * scale * torch.randn(p.shape, generator=g)
            p.grad = grad if p.grad is None else p.grad.copy_(grad)   # in place once the fused one holds it
    trainstep.update(state, {}, total=torch.zeros(()), keys=[[]])


@pytest.mark.parametrize('saved_on, resumed_on', [('npu', 'cpu'), ('cpu', 'npu')])
def test_a_checkpoint_resumes_on_the_other_device_kind_as_if_uninterrupted(npu_910, tmp_path, saved_on,
                                                                              resumed_on):
    """2 steps, a checkpoint through the file, 2 more steps: the run resumed from it on the other
    kind of optimiser ends with the weights and AdamW state of the uninterrupted run. Breaks
    caught: an int step loaded into torch's AdamW (it then never counts on: bias corrections of
    step 1), the checkpoint's `fused` flag carried onto this device's optimiser (the CPU's
    found_inf skip lost), moments loaded after the fused optimiser combined its own."""
    cfg, state, _ = _run(saved_on)
    for t in range(2):
        _fixed_step(state, t)
    checkpoints.save_checkpoint(tmp_path / 'last.pt', state.state_dict(cfg.to_dict()))
    for t in range(2, 4):
        _fixed_step(state, t)
    _, resumed, _ = _run(resumed_on)
    resumed.load_state_dict(checkpoints.load_checkpoint(tmp_path / 'last.pt'))
    assert resumed.optimizer.param_groups[0].get('fused') is (True if resumed_on == 'cpu' else None)
    loaded = _weights(resumed)
    for t in range(2, 4):
        _fixed_step(resumed, t)
    assert resumed.step == state.step == 4
    want, got = _weights(state), _weights(resumed)
    assert [k for k, v in loaded.items() if torch.equal(got[k], v)] == ['logit_scale', 'visual.conv1.weight']
    for k, v in want.items():
        assert_close(got[k], v, msg=k)
    s_got, s_want = resumed.optimizer.state_dict()['state'], state.optimizer.state_dict()['state']
    assert s_got.keys() == s_want.keys()
    for i, w in s_want.items():
        assert float(s_got[i]['step']) == float(w['step']) == 4
        for name in MOMENTS:
            assert_close(s_got[i][name], w[name])


def test_the_fused_state_is_loaded_before_its_first_step_only(npu_910):
    """After its first step it steps combined copies of the moments: a later load would be
    ignored silently, so it is refused."""
    cfg, state, batch = _run('npu')
    saved = state.optimizer.state_dict()
    step(state, batch, cfg)
    with pytest.raises(RuntimeError, match='before its first step'):
        state.optimizer.load_state_dict(saved)


# ---------------------------------------------------------------- skipped steps


def test_a_skipped_step_changes_no_weight_and_no_state_on_the_fused_path(npu_910, monkeypatch):
    """A NaN loss: the scaler finds the gradients non-finite and the optimiser step is not
    called; weights, moments and step counts stay as they were, the gradients are zeroed in place
    (the next step accumulates into its buffer), and the next good step trains on."""
    cfg, state, batch = _run('npu')
    nonfinite_at(monkeypatch, [False, True])
    assert float(step(state, batch, cfg)['skipped']) == 0
    weights, saved, calls = _weights(state), state.optimizer.state_dict(), state.optimizer.calls
    scale = state.scaler.get_scale()
    assert float(step(state, batch, cfg)['skipped']) == 1
    assert state.optimizer.calls == calls and state.scaler.get_scale() == scale / 2
    assert all(torch.equal(p, weights[k]) for k, p in state.model.named_parameters())
    now = state.optimizer.state_dict()
    assert now['state'].keys() == saved['state'].keys()
    for i, s in saved['state'].items():
        assert float(now['state'][i]['step']) == float(s['step']) == 1
        assert all(torch.equal(now['state'][i][n], s[n]) for n in MOMENTS)
    assert int(torch.count_nonzero(state.optimizer.grads)) == 0
    assert float(step(state, batch, cfg)['skipped']) == 0
    assert all(torch.isfinite(p).all() for p in state.model.parameters())
    assert any(not torch.equal(p, weights[k]) for k, p in state.model.named_parameters())
    assert {s['step'] for s in state.optimizer.state.values()} == {2}



def test_a_loss_scaler_state_from_torch_loads_into_torch_npus_scaler():
    """torch_npu's GradScaler.load_state_dict reads a 'dynamic' key that torch's scaler never writes:
    an fp16 checkpoint from a GPU run resumes on a 910 (dynamic scaling, as both use), and torch's
    own scaler still loads it. (Break caught: the key not supplied: KeyError on the NPU.)"""
    from tiny_step import tiny_state

    class NpuScaler:   # what torch_npu's GradScaler.load_state_dict reads first
        def load_state_dict(self, sd):
            self.dynamic, self.scale = sd['dynamic'], sd['scale']

    _, state, _ = tiny_state()
    saved = state.state_dict({})
    saved['scaler'] = torch.amp.GradScaler('cpu', init_scale=512.0).state_dict()
    state.scaler = NpuScaler()
    state.load_state_dict(saved)
    assert state.scaler.dynamic is True and state.scaler.scale == 512.0
    state.scaler = torch.amp.GradScaler('cpu')
    state.load_state_dict(saved)
    assert state.scaler.get_scale() == 512.0
