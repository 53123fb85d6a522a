"""tools/bench.py runs end to end on CPU with tiny settings (speed figures are not asserted; the
bf16-against-fp32 check is), and its step is the training loop's step."""
import contextlib
import itertools
import json
import shlex
import subprocess
import types

import pytest
import torch

import configs.demo
import declip
import guard
import loader
import runtime
import train
from helpers import ROOT, captured_graphs, scalars, write_jpeg
from tools import bench


def test_bench_modes_smoke(tmp_path):
    for i in range(4):
        write_jpeg(tmp_path / f'{i}.jpg', size=(120, 90), seed=i)
    out = tmp_path / 'out.json'
    r = bench.main(['data', '--images', str(tmp_path), '--seconds', '0.05', '--device_pairs', '2',
                    '--index_lines', '1000', '--out', str(out)])
    assert r['index']['lines'] == 1000 and r['cpu_part_pairs_per_s_core'] > 0
    assert json.loads(out.read_text())['mode'] == 'data'
    r = bench.main(['step', '--config', 'configs/demo.py:smoke', '--batch', '4', '--warmup', '1', '--steps', '1',
                    '--matmul_n', '64', '--out', str(out)])
    assert r['flops_per_step'] > 0 and r['img_per_s'] > 0 and 0 < r['mfu']
    r = bench.main(['e2e', '--config', 'configs/demo.py:smoke', '--images', str(tmp_path), '--workers', '0',
                    '--batch', '2', '--size', '32', '--warmup', '1', '--steps', '2', '--out', str(out)])
    assert r['pairs_per_s'] > 0 and 0 <= r['data_wait_frac'] <= 1
    r = bench.main(['e2e', '--config', 'configs/demo.py:smoke', '--images', str(tmp_path), '--workers', '0',
                    '--batch', '2', '--size', '32', '--warmup', '1', '--steps', '2', '--decode', 'device',
                    '--out', str(out)])
    assert r['decode'] == 'device' and r['pairs_per_s'] > 0


def test_bench_parts_and_precision(tmp_path):
    out = tmp_path / 'out.json'
    r = bench.main(['parts', '--config', 'configs/demo.py:smoke', '--batch', '4', '--rounds', '1', '--out', str(out)])
    assert len(r['parts']) == 8 and all(p['before_ms'] > 0 and p['after_ms'] > 0 for p in r['parts'].values())
    r = bench.main(['precision', '--config', 'configs/demo.py:smoke', '--batch', '4', '--steps', '3',
                    '--compare', '3', '--out', str(out)])
    assert r['finite'] and r['ok'] and 0 < r['max_rel_diff'] < 0.02  # bf16 autocast really ran
    assert len(r['losses']['fp32']) == len(r['losses']['bf16']) == 3


def test_bench_step_is_the_training_step(tmp_path, monkeypatch):
    """The step `bench.py step` times and train.train's loop give the same losses, step after step,
    on the same synthetic batch (fp32 on CPU): the benchmark cannot drift from the loop again."""
    cfg = configs.demo.get_config('smoke')
    (tmp_path / 'train.jsonl').write_text(json.dumps({'filename': 'x.jpg', 'caption': 'a cat'}) + '\n')
    write_jpeg(tmp_path / 'x.jpg')  # the pre-flight check reads the first images
    cfg.data.update(dict(train_meta=str(tmp_path / 'train.jsonl'), train_root=str(tmp_path), val_meta=''))
    cfg.update(dict(log_every=1, max_iter=3))
    cfg.runtime.update(dict(precision='fp32', compile='false'))
    batch = bench._synthetic_batch(cfg, cfg.data.batch_size, torch.device('cpu'))
    batch['bad'] = torch.zeros(len(guard.BAD_KINDS), dtype=torch.long)
    step = bench.trainer(cfg, torch.device('cpu'))
    bench_losses = [float(step(batch)) for _ in range(3)]

    monkeypatch.setattr(loader, 'build_train_loader', lambda *a, **k: itertools.repeat(batch))
    monkeypatch.setattr(runtime, 'setup_device', lambda *a: (torch.device('cpu'), 'cpu'))  # on any machine
    train.train(cfg, tmp_path / 'run')
    logged, _ = scalars(tmp_path / 'run', 'loss/total')
    assert [logged[t] for t in (1, 2, 3)] == pytest.approx(bench_losses, rel=1e-6)
    assert len(set(bench_losses)) == 3   # the steps really differ (weights, LR, augmentation)


def test_bench_scopes_runs_the_step_scope_compiled_and_exact(tmp_path, monkeypatch):
    """`scopes` runs the loop's step under each compile setting from the same weights over the same
    batches. Under compile='step' the objective is what dynamo captured besides the model, nothing in
    it compiles again when the masked-token count changes, and the losses are eager's (dynamo's plain
    backend: the capture is tested here, inductor's code by running the mode)."""
    with captured_graphs(monkeypatch) as graphs:
        r = bench.main(['scopes', '--config', 'configs/demo.py:smoke', '--batch', '8', '--warmup', '1', '--steps', '2',
                        '--scopes', 'false,step', '--out', str(tmp_path / 'out.json')])
        again = {code.co_filename for code in torch._dynamo.utils.guard_failures}
    assert any('in declip_loss' in g for g in graphs)
    assert not any('images.py' in g for g in graphs)   # the colour ops stay eager
    assert not {f for f in again if f.endswith('losses.py')}, again
    eager, step = r['scopes']['false'], r['scopes']['step']
    assert (eager['compile'], step['compile']) == (None, 'step') and eager['ratio'] == 1
    assert len(step['losses']) == 3 and len(set(eager['losses'])) == 3   # three different steps
    assert step['losses'] == pytest.approx(eager['losses'], rel=1e-6) and step['max_rel_diff'] < 1e-6
    assert step['step_ms'] > 0 and step['warmup_s'] > 0


def test_make_bench_gpu_commands_are_valid():
    """Every bench.py command of `make bench-gpu` and `make bench-gpu-more` names a mode, flags bench.py
    defines, a config file that exists and config keys it has: a typo would first show on a GPU."""
    script = subprocess.run(['make', '-n', 'bench-gpu', 'bench-gpu-more', 'OUT=out'], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.replace('\\\n', ' ').replace('$b', '512')
    commands = [shlex.split(line) for line in script.splitlines() if 'tools/bench.py' in line]
    assert len(commands) >= 10
    bench.define_flags()
    for words in commands:
        args = words[words.index('tools/bench.py') + 1:]
        args = args[:next((i for i, w in enumerate(args) if w in ('||', '&&') or w.endswith(';')), len(args))]
        bench.FLAGS.unparse_flags()
        mode, = bench.FLAGS(['bench.py', *args])[1:]
        assert mode in bench.MODES, words
        bench._load_config(bench.FLAGS.config, overrides=bench.FLAGS.set)   # an unknown key raises


def test_step_peak_memory_is_the_timed_steps(monkeypatch):
    """The FLOP count runs a step eager: `step`'s peak memory is reset after it (and after the sync
    check, which runs no step on CPU), so a compiled step's figure is the compiled step's (it was the
    eager one's)."""
    events = []

    @contextlib.contextmanager
    def counted():
        events.append('count')
        yield types.SimpleNamespace(get_total_flops=lambda: 1)
    monkeypatch.setattr(runtime, 'flop_counter', counted)
    monkeypatch.setattr(runtime, 'reset_peak_memory', lambda device_type: events.append('reset'))

    def step():
        events.append('step')
        return torch.zeros(())
    bench._time_step(step, torch.device('cpu'), warmup=2, steps=3)
    assert events == ['step', 'step', 'count', 'step', 'reset', 'step', 'step', 'step'], events


def test_bench_saved_counts_what_the_step_keeps(tmp_path):
    """`saved`: the rows add up to the total, the model state is 16 bytes per trained fp32 weight, and
    each tower's QuickGELU keeps exactly its input, layers x tokens x 4 width fp32 values for each
    image view (2) and caption (the masked one and the EDA one)."""
    r = bench.main(['saved', '--config', 'configs/demo.py:smoke', '--batch', '4', '--precision', 'fp32',
                    '--out', str(tmp_path / 'out.json')])
    m = configs.demo.get_config('smoke').model
    parts = {(p['part'], p['module'], p['dtype']): p['bytes'] for p in r['parts']}
    assert sum(parts.values()) == r['saved_bytes'] and parts[('objective', '-', 'float32')] > 0
    trained = sum(p.numel() for p in declip.build_model(m).parameters() if p.requires_grad)
    assert r['model_state_bytes'] == 16 * trained
    tokens = (m.image_size // m.patch_size) ** 2 + 1
    assert parts[('visual', 'QuickGELU', 'float32')] == 4 * m.vision_layers * (4 * 2) * tokens * 4 * m.vision_width
    assert parts[('encode_text', 'QuickGELU', 'float32')] == (
        4 * m.text_layers * (4 * 2) * m.context_length * 4 * m.text_width)
