"""Devices, precision and the torch_npu import: the choices the Ascend, CUDA and CPU paths depend on."""
import importlib.abc
import sys

import pytest
import torch

import evaluate
import runtime
from helpers import run, smoke_overrides

# (precision, device type, bf16 supported) -> what runs
PRECISION_TABLE = [
    ('auto', 'cpu', False, 'fp32'), ('auto', 'cpu', True, 'fp32'),
    ('auto', 'cuda', True, 'bf16'), ('auto', 'cuda', False, 'fp16'),   # pre-Ampere CUDA
    ('auto', 'npu', True, 'bf16'),                                     # Ascend 910B
    ('auto', 'npu', False, 'fp16'),                                    # Ascend 910: no bf16
    ('fp32', 'npu', True, 'fp32'), ('bf16', 'cpu', False, 'bf16'), ('fp16', 'cuda', True, 'fp16'),
]


@pytest.mark.parametrize('name, device_type, bf16, want', PRECISION_TABLE)
def test_precision_choice(name, device_type, bf16, want):
    assert runtime.choose_precision(name, device_type, bf16) == want


def test_precision_typo_is_refused():
    with pytest.raises(ValueError, match="got 'bf32'"):
        runtime.choose_precision('bf32', 'cuda', True)


def test_fp16_uses_a_loss_scaler_and_others_do_not():
    assert runtime.precision('fp16', 'cpu')[2] and runtime.grad_scaler('cpu', True).is_enabled()
    assert not runtime.precision('auto', 'cpu')[2] and not runtime.grad_scaler('cpu', False).is_enabled()


class _Broken(importlib.abc.MetaPathFinder):
    """Makes `import torch_npu` fail as it does on a host without CANN's libraries."""

    def find_spec(self, name, path, target=None):
        if name == 'torch_npu':
            raise ImportError('libascendcl.so: cannot open shared object file: No such file or directory')
        return None


def test_torch_npu_absent_is_normal_but_broken_is_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch_npu', None)          # not installed
    runtime.import_torch_npu()
    monkeypatch.delitem(sys.modules, 'torch_npu')
    monkeypatch.setattr(sys, 'meta_path', [_Broken(), *sys.meta_path])
    with pytest.raises(RuntimeError, match='libascendcl.so'):
        runtime.import_torch_npu()


def test_an_explicit_device_must_exist():
    assert runtime.setup_device(0, 'cpu') == (torch.device('cpu'), 'cpu')
    seen = torch.accelerator.current_accelerator().type if torch.accelerator.is_available() else 'cpu'
    missing = next(d for d in ('npu', 'cuda') if d != seen)
    with pytest.raises(RuntimeError, match=f"config.device='{missing}'"):
        runtime.setup_device(0, missing)
    with pytest.raises(ValueError, match='config.device'):
        runtime.setup_device(0, 'gpu')


def test_missing_device_fails_before_any_work(tmp_path, demo_dir):
    seen = torch.accelerator.current_accelerator().type if torch.accelerator.is_available() else 'cpu'
    missing = next(d for d in ('npu', 'cuda') if d != seen)
    res = run(['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(tmp_path / 'w'),
               *smoke_overrides(demo_dir, device=missing)])
    assert res.returncode != 0 and f"config.device='{missing}'" in res.stderr
    assert not (tmp_path / 'w').exists()


def test_evaluation_counts_are_reduced_as_int64(monkeypatch):
    """HCCL reduces no float64: the counts travel as int64."""
    seen = []
    monkeypatch.setattr(evaluate, '_all_reduce', lambda t: seen.append(t.dtype) or t)

    class Constant(torch.nn.Module):
        def encode_image(self, images):
            return images.float().mean(dim=(2, 3))
    images = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
    images[0, 0] = images[1, 1] = 255
    m = evaluate.zero_shot_eval(Constant(), [(images, torch.tensor([0, 1]), torch.arange(2))], torch.eye(3),
                                label_ids=[0, 1, 2], device='cpu', mean=(0, 0, 0), std=(1, 1, 1),
                                autocast=torch.autocast('cpu', enabled=False))
    assert seen == [torch.int64] and m['zeroshot_top1'] == 100.0 and m['images'] == 2


def test_a_training_step_creates_no_float64_tensor():
    """Ascend kernels reject float64: a whole DeCLIP step (colour ops, hue and blur included) and
    its checkpoint-free bookkeeping stay in float32 and integer types."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import bench
    import trainstep
    from configs import demo

    class Dtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.seen.setdefault(t.dtype, str(func))
            return out

    cfg = demo.get_config('smoke')
    cfg.compile = 'false'
    state = trainstep.build_state(cfg, torch.device('cpu'))
    batch = bench._synthetic_batch(cfg, 8, torch.device('cpu'))
    _, autocast, _ = runtime.precision('fp32', 'cpu')
    with Dtypes() as mode:
        for _ in range(2):   # the colour ops draw every op for some sample of 16 views
            metrics = trainstep.train_step(state, batch, cfg=cfg, autocast=autocast, grad_norm=True)
    assert torch.isfinite(metrics['loss']['total'])
    assert torch.float32 in mode.seen and torch.float64 not in mode.seen, mode.seen.get(torch.float64)


# (device type, jit setting, static setting, chip, kernel folders installed) -> (jit, static shapes)
SHAPE_TABLE = [
    ('cpu', 'auto', 'auto', '', set(), (None, False)),
    ('cuda', 'auto', 'true', '', set(), (None, True)),
    ('npu', 'auto', 'auto', 'Ascend910B3', {'ascend910b'}, (False, False)),       # 910B: binary kernels
    ('npu', 'auto', 'auto', 'Ascend910A', set(), (True, True)),                   # 910 without them
    ('npu', 'auto', 'auto', 'Ascend910ProB', {'ascend910'}, (False, False)),      # 910 with them
    ('npu', 'auto', 'auto', 'Ascend910A', {'ascend910b'}, (True, True)),          # another chip's kernels
    ('npu', 'auto', 'auto', 'Ascend910_9391', {'ascend910_93'}, (False, False)),
    ('npu', 'true', 'auto', 'Ascend910B1', {'ascend910b'}, (True, True)),
    ('npu', 'false', 'false', 'Ascend910A', set(), (False, False)),
    ('npu', 'auto', 'true', 'Ascend910B1', {'ascend910b'}, (False, True)),
]


@pytest.mark.parametrize('device_type, jit, static, chip, kernels, want', SHAPE_TABLE)
def test_shape_modes(device_type, jit, static, chip, kernels, want):
    assert runtime.shape_modes(device_type, jit_compile=jit, static_shapes=static, device_name=chip,
                               kernel_dirs=kernels) == want


def test_shape_mode_typo_names_the_key():
    with pytest.raises(ValueError, match='config.static_shapes'):
        runtime.shape_modes('npu', static_shapes='yes')


def test_version_floors():
    runtime.check_versions('2.13.0+cpu')
    runtime.check_versions('2.6.0', '2.6.0.post3')
    with pytest.raises(RuntimeError, match='torch >= 2.6'):
        runtime.check_versions('2.5.1')
    with pytest.raises(RuntimeError, match='torch_npu 2.5.1 does not match torch 2.6.0'):
        runtime.check_versions('2.6.0', '2.5.1')


def test_static_colour_ops_equal_the_per_sample_ones():
    import images
    x = torch.randint(0, 256, (24, 3, 20, 20), dtype=torch.uint8)
    dynamic = images.device_augment(x, generator=torch.Generator().manual_seed(3))
    static = images.device_augment(x, generator=torch.Generator().manual_seed(3), static=True)
    assert not torch.equal(dynamic, images.normalize_images(x))   # some op changed something
    torch.testing.assert_close(static, dynamic, rtol=0, atol=1e-6)


def test_a_static_shape_step_equals_the_dynamic_one():
    """Padding the masked tokens to the bucket and running colour ops over the whole batch change
    no loss term and no gradient."""
    import bench
    import trainstep
    from configs import demo
    cfg = demo.get_config('smoke')
    cfg.compile, cfg.mlm_bucket = 'false', 64
    batch = bench._synthetic_batch(cfg, 8, torch.device('cpu'))
    assert len(batch['mlm_index']) % 64   # padding has something to do
    _, autocast, _ = runtime.precision('fp32', 'cpu')
    out = []
    for static in (False, True):
        state = trainstep.build_state(cfg, torch.device('cpu'))
        state.static_shapes = static
        state.optimizer.step = lambda: None   # keep the gradients to compare them
        state.optimizer.zero_grad = lambda set_to_none=True: None
        metrics = trainstep.train_step(state, batch, cfg=cfg, autocast=autocast)
        out.append((metrics['loss'], {k: p.grad.clone() for k, p in state.model.named_parameters()
                                      if p.grad is not None}))
    for k, v in out[0][0].items():
        torch.testing.assert_close(out[1][0][k], v, rtol=1e-6, atol=1e-7)
    assert out[0][0]['mlm'] > 0 and out[0][1].keys() == out[1][1].keys()
    for k, g in out[0][1].items():
        torch.testing.assert_close(out[1][1][k], g, rtol=1e-5, atol=1e-7, msg=k)


def test_device_decode_is_refused_on_npu(monkeypatch, tmp_path, demo_dir):
    import train
    from configs import demo
    cfg = demo.get_config('smoke')
    cfg.data.decode = 'device'
    monkeypatch.setattr(runtime, 'check_versions', lambda *a: None)
    monkeypatch.setattr(runtime, 'setup_device', lambda rank, requested: (torch.device('cpu'), 'npu'))
    monkeypatch.setattr(train, 'check_config', lambda cfg: None)
    with pytest.raises(ValueError, match='decode=device needs CUDA'):
        train.train(cfg, tmp_path / 'w')
    assert not (tmp_path / 'w').exists()


def test_ranks_come_from_torchrun_else_slurm(monkeypatch):
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_LOCALID'):
        monkeypatch.delenv(k, raising=False)
    assert runtime.dist_env() == (0, 1, 0)
    monkeypatch.setenv('SLURM_PROCID', '5')
    monkeypatch.setenv('SLURM_NTASKS', '8')
    monkeypatch.setenv('SLURM_LOCALID', '1')
    assert runtime.dist_env() == (5, 8, 1)
    monkeypatch.setenv('RANK', '2')           # torchrun inside a SLURM allocation wins
    monkeypatch.setenv('WORLD_SIZE', '4')
    monkeypatch.setenv('LOCAL_RANK', '2')
    assert runtime.dist_env() == (2, 4, 2)
    monkeypatch.delenv('MASTER_ADDR', raising=False)
    with pytest.raises(RuntimeError, match='MASTER_ADDR'):
        runtime.init_distributed('cpu', 2, 4, 10)


def test_counting_flops_keeps_compiled_code_in_use():
    """A compiled function called under torch's FLOP counter is dropped for the rest of the process;
    runtime.flop_counter bypasses it instead, so the steps after the counted one run compiled."""
    from torch.profiler import profile

    def f(x):
        return (x @ x).relu().sum()

    g, x = torch.compile(f, backend='eager'), torch.randn(8, 8)
    g(x)
    with runtime.flop_counter() as counter:
        counted = g(x)
    assert counter.get_total_flops() == 2 * 8 ** 3
    assert counted == f(x)
    with profile() as prof:
        g(x)
    assert any('Torch-Compiled Region' in e.name for e in prof.events())


def test_compile_setting_picks_what_is_compiled():
    """config.compile: 'model' (and 'true', and 'auto' on CUDA only) compiles the whole training
    forward (heads included), 'towers' the two towers, 'false' nothing; a typo is an error naming
    the key. (Breaks caught: 'auto' compiling on CPU, 'model' compiling only the towers.)"""
    import trainstep
    from configs import demo
    cfg = demo.get_config('smoke')
    for setting, device_type, want in (('model', 'cpu', 'model'), ('towers', 'cpu', 'towers'), ('true', 'cpu', 'model'),
                                       ('auto', 'cpu', None), ('auto', 'cuda', 'model'), ('false', 'cuda', None)):
        assert trainstep.compile_scope(setting, device_type) == want, (setting, device_type)
    for setting, want in (('model', 'model'), ('towers', 'towers'), ('auto', None)):
        cfg.compile = setting
        model = trainstep.build_model(cfg, torch.device('cpu'))
        got = 'model' if model._compiled_call_impl is not None else (
            'towers' if model.visual._compiled_call_impl is not None and model.encode_text._compiled_call_impl is not None
            else None)
        assert got == want, setting
        assert all(not k.startswith('_orig_mod') for k in model.state_dict())
    with pytest.raises(ValueError, match=r"config\.compile: one of .*got 'yes'"):
        trainstep.compile_scope('yes', 'cpu')
