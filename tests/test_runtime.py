"""Devices, precision and the torch_npu import: the choices the Ascend, CUDA and CPU paths depend on."""
import importlib.abc
import sys
import types
from pathlib import Path

import pytest
import torch

import checks
import evaluate
import runtime
from helpers import DtypeRecorder, run, smoke_overrides

# (precision, device type, bf16 supported) -> what runs
PRECISION_TABLE = [
    ('auto', 'cpu', False, 'fp32'), ('auto', 'cpu', True, 'fp32'),
    ('auto', 'cuda', True, 'bf16'), ('auto', 'cuda', False, 'fp16'),   # pre-Ampere CUDA
    ('auto', 'npu', True, 'bf16'),                                     # Ascend 910B
    ('auto', 'npu', False, 'fp16'),                                    # Ascend 910: no bf16
    ('fp32', 'npu', True, 'fp32'), ('bf16', 'cpu', False, 'bf16'), ('fp16', 'cuda', True, 'fp16'),
    ('bf16', 'npu', True, 'bf16'), ('fp16', 'npu', False, 'fp16'), ('fp32', 'npu', False, 'fp32'),
]


@pytest.mark.parametrize('name, device_type, bf16, want', PRECISION_TABLE)
def test_precision_choice(name, device_type, bf16, want):
    assert runtime.choose_precision(name, device_type, bf16) == want


def test_precision_typo_is_refused():
    with pytest.raises(ValueError, match="got 'bf32'"):
        runtime.choose_precision('bf32', 'cuda', True)


@pytest.mark.parametrize('device_type', ['npu', 'cuda'])
def test_explicit_bf16_without_bf16_is_refused_naming_the_key(monkeypatch, device_type):
    """The Ascend 910 (and pre-Ampere CUDA) has no bf16: its autocast would turn itself off and
    run fp32 without a loss scaler while the run says bf16."""
    with pytest.raises(ValueError, match=f'this {device_type} has no bf16'):
        runtime.choose_precision('bf16', device_type, False)
    monkeypatch.setattr(runtime, 'bf16_supported', lambda device_type: False)
    runtime.check_precisions(device_type, {'config.runtime.precision': 'auto', 'config.eval.precision': 'fp32'})
    with pytest.raises(ValueError, match=r'^config\.eval\.precision=bf16: this .* has no bf16[^\n]*$'):
        runtime.check_precisions(device_type, {'config.runtime.precision': 'fp16', 'config.eval.precision': 'bf16'})


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
    with pytest.raises(RuntimeError, match=f"config.runtime.device='{missing}'"):
        runtime.setup_device(0, missing)
    with pytest.raises(ValueError, match='config.runtime.device'):
        runtime.setup_device(0, 'gpu')


def test_missing_device_fails_before_any_work(tmp_path, demo_dir):
    seen = torch.accelerator.current_accelerator().type if torch.accelerator.is_available() else 'cpu'
    missing = next(d for d in ('npu', 'cuda') if d != seen)
    res = run(['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(tmp_path / 'w'),
               *smoke_overrides(demo_dir, **{'runtime.device': missing})])
    assert res.returncode != 0 and f"config.runtime.device='{missing}'" in res.stderr
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
    from tools import bench
    import trainstep
    from configs import demo

    cfg = demo.get_config('smoke')
    cfg.runtime.compile = 'false'
    state = trainstep.build_state(cfg, torch.device('cpu'))
    batch = bench._synthetic_batch(cfg, 8, torch.device('cpu'))
    with DtypeRecorder() as mode:
        for _ in range(2):   # the colour ops draw every op for some sample of 16 views
            metrics = trainstep.train_step(state, batch, cfg)
    assert torch.isfinite(metrics['loss']['total'])
    assert torch.float32 in mode.seen and torch.float64 not in mode.seen, mode.seen.get(torch.float64)


# (device type, jit setting, static setting, torch_npu's default jit mode) -> (jit, static shapes)
SHAPE_TABLE = [
    ('cpu', 'auto', 'auto', True, (None, False)),
    ('cuda', 'auto', 'true', True, (None, True)),
    ('npu', 'auto', 'auto', False, (False, False)),      # binary kernels: torch_npu's default is jit off
    ('npu', 'auto', 'auto', True, (True, True)),         # online compile: static shapes
    ('npu', 'true', 'auto', False, (True, True)),
    ('npu', 'false', 'auto', True, (False, False)),
    ('npu', 'false', 'false', True, (False, False)),
    ('npu', 'auto', 'true', False, (False, True)),
    ('npu', 'auto', 'false', True, (True, False)),
]


@pytest.mark.parametrize('device_type, jit, static, default, want', SHAPE_TABLE)
def test_shape_modes(device_type, jit, static, default, want):
    assert runtime.shape_modes(device_type, jit_compile=jit, static_shapes=static, jit_default=default) == want


@pytest.mark.parametrize('setting, default, want_set', [('auto', True, None), ('auto', False, None),
                                                        ('true', False, True), ('false', True, False)])
def test_npu_compile_mode_is_read_for_auto_and_set_otherwise(monkeypatch, setting, default, want_set):
    """'auto' leaves torch_npu's compile mode alone and reads it (static shapes follow it)."""
    calls = []
    npu = types.SimpleNamespace(is_jit_compile_false=lambda: not default,
                                set_compile_mode=lambda jit_compile: calls.append(jit_compile))
    monkeypatch.setattr(torch, 'npu', npu, raising=False)
    jit = default if want_set is None else want_set
    assert runtime.configure_shapes('npu', jit_compile=setting) == (jit, jit)
    assert calls == ([] if want_set is None else [want_set])


def test_shape_mode_typo_names_the_key():
    with pytest.raises(ValueError, match='config.runtime.static_shapes'):
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
    from tools import bench
    import trainstep
    from configs import demo
    cfg = demo.get_config('smoke')
    cfg.runtime.compile, cfg.runtime.mlm_bucket = 'false', 64
    batch = bench._synthetic_batch(cfg, 8, torch.device('cpu'))
    assert len(batch['mlm_index']) % 64   # padding has something to do
    out = []
    for static in (False, True):
        state = trainstep.build_state(cfg, torch.device('cpu'))
        state.static_shapes = static
        state.optimizer.step = lambda: None   # keep the gradients to compare them
        state.optimizer.zero_grad = lambda set_to_none=True: None
        metrics = trainstep.train_step(state, batch, cfg)
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
    monkeypatch.setattr(checks, 'check_config', lambda cfg: None)
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
    """config.runtime.compile: 'model' (and 'true', and 'auto' on CUDA only) compiles the whole training
    forward (heads included), 'towers' the two towers, 'false' nothing; a typo is an error naming
    the key. (Breaks caught: 'auto' compiling on CPU, 'model' compiling only the towers.)"""
    import trainstep
    from configs import demo
    cfg = demo.get_config('smoke')
    for setting, device_type, want in (('model', 'cpu', 'model'), ('towers', 'cpu', 'towers'), ('true', 'cpu', 'model'),
                                       ('auto', 'cpu', None), ('auto', 'cuda', 'model'), ('false', 'cuda', None)):
        assert trainstep.compile_scope(setting, device_type) == want, (setting, device_type)
    for setting, want in (('model', 'model'), ('towers', 'towers'), ('auto', None)):
        cfg.runtime.compile = setting
        model = trainstep.build_model(cfg, torch.device('cpu'))
        got = 'model' if model._compiled_call_impl is not None else (
            'towers' if model.visual._compiled_call_impl is not None and model.encode_text._compiled_call_impl is not None
            else None)
        assert got == want, setting
        assert all(not k.startswith('_orig_mod') for k in model.state_dict())
    with pytest.raises(ValueError, match=r"config\.runtime\.compile: one of .*got 'yes'"):
        trainstep.compile_scope('yes', 'cpu')


class _FakeNPU:
    """torch.npu as runtime uses it, recording each setting in `events`."""

    def __init__(self, events, bf16=True, jit_off=True):
        class Settings:
            def __init__(self, prefix):
                object.__setattr__(self, 'prefix', prefix)

            def __setattr__(self, name, value):
                events.append(f'{self.prefix}.{name}={value}')
        self.config, self.matmul, self.conv = Settings('config'), Settings('matmul'), Settings('conv')
        self.is_bf16_supported = lambda: bf16
        self.is_jit_compile_false = lambda: jit_off
        self.set_compile_mode = lambda jit_compile: events.append(f'set_compile_mode({jit_compile})')


def _fake_npu_machine(monkeypatch, events, **npu):
    """runtime sees one Ascend device (its tensors stay on the CPU): torch_npu imports, torch's
    accelerator is 'npu', torch.npu is _FakeNPU. Only runtime's view of torch changes."""
    fake_npu = _FakeNPU(events, **npu)

    class Torch(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)
    fake = Torch('torch')
    fake.npu = fake_npu
    fake.device = lambda device_type, index=None: torch.device('cpu')
    fake.get_device_module = lambda device_type: fake_npu if device_type == 'npu' else torch.get_device_module(device_type)
    fake.accelerator = types.SimpleNamespace(is_available=lambda: True, set_device_index=lambda index: None,
                                             current_accelerator=lambda: types.SimpleNamespace(type='npu'))
    monkeypatch.setattr(runtime, 'torch', fake)
    monkeypatch.setattr(runtime, 'import_torch_npu', lambda: types.SimpleNamespace(__version__=torch.__version__))


def test_npu_settings_come_before_the_model_is_built(monkeypatch, tmp_path):
    """torch_npu stores BatchNorm parameters as NC1HWC0 and conv weights as FRACTAL_Z on .to()
    unless internal formats are off; HF32 convolutions would make fp32 not fp32."""
    import declip
    import train
    from configs import demo
    events = []
    _fake_npu_machine(monkeypatch, events)

    class Built(Exception):
        pass

    def build_model(model_cfg):
        events.append('build_model')
        raise Built
    monkeypatch.setattr(declip, 'build_model', build_model)
    monkeypatch.setattr(checks, 'check_config', lambda cfg: None)   # the demo data need not exist
    cfg = demo.get_config('smoke')
    cfg.runtime.precision = 'fp32'    # no npu autocast on this CPU
    with pytest.raises(Built):
        train.train(cfg, tmp_path / 'w')
    assert events == ['config.allow_internal_format=False', 'matmul.allow_hf32=False', 'conv.allow_hf32=False',
                      'build_model']   # torch_npu's compile mode (off here) left alone


@pytest.mark.parametrize('key', ['runtime.precision', 'eval.precision'])
def test_training_refuses_bf16_on_an_npu_without_it_before_any_work(monkeypatch, tmp_path, key):
    import train
    from configs import demo
    _fake_npu_machine(monkeypatch, [], bf16=False)
    monkeypatch.setattr(checks, 'check_config', lambda cfg: None)
    cfg = demo.get_config('smoke')
    cfg.update_from_flattened_dict({key: 'bf16'})
    with pytest.raises(ValueError, match=f'config.{key}=bf16: this npu has no bf16'):
        train.train(cfg, tmp_path / 'w')
    assert not (tmp_path / 'w').exists()


def test_evaluation_refuses_bf16_on_an_npu_without_it(tmp_path):
    """evaluate.py --precision bf16 on a (fake) Ascend 910 stops with one line naming the flag,
    before it reads the checkpoint."""
    script = tmp_path / 'npu_eval.py'
    script.write_text(f"""import runpy, sys, types
sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]
import pytest
import test_runtime
test_runtime._fake_npu_machine(pytest.MonkeyPatch(), [], bf16=False)
sys.argv = ['evaluate.py', '--ckpt', 'missing.pt', '--precision', 'bf16']
runpy.run_path('evaluate.py', run_name='__main__')
""")
    res = run([str(script)], timeout=300)
    assert res.returncode != 0 and 'ValueError: --precision=bf16: this npu has no bf16' in res.stderr, res.stderr[-2000:]
    assert 'missing.pt' not in res.stderr
