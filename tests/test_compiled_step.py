"""config.runtime.compile='step': what it compiles, captured by dynamo's plain backend (the capture is
tested here, inductor's code by `tools/bench.py scopes`; the one-pass step in tests/test_bench.py)."""
import torch

import trainstep
from helpers import captured_graphs
from tiny_step import CPU, step, tiny_state
from tools import bench


def test_step_scope_builds_a_compiled_model_and_marks_the_state():
    cfg, _, _ = tiny_state()
    cfg.runtime.compile = 'step'
    state = trainstep.build_state(cfg, CPU)
    assert trainstep.compile_scope('step', 'cpu') == 'step' and state.compiled
    assert state.model._compiled_call_impl is not None


def test_the_accumulation_step_runs_its_objective_compiled(monkeypatch):
    """With accum_steps 2, the contrastive terms, the device terms and GradCache's surrogate are what
    dynamo captured, the second step (other masked-token counts) compiles nothing new, and two steps
    give the eager step's losses and weights."""
    runs = []
    with captured_graphs(monkeypatch) as sources:
        for compiled in (False, True):
            cfg, state, first = tiny_state(batch=8, accum_steps=2)   # masked tokens per part: 5, 2
            second = bench._synthetic_batch(cfg, 8, CPU, seed=1)          # 4, 6 (a count of 1 is compiled apart)
            assert len(second['mlm_index']) != len(first['mlm_index'])
            state.compiled = compiled
            losses = [step(state, first, cfg)['loss']]
            after_first = len(sources)
            losses.append(step(state, second, cfg)['loss'])
            runs.append((losses, state.model.state_dict()))
    for source in ('in contrastive_terms', 'in device_terms', 'in surrogate_loss'):
        assert any(source in s for s in sources), source
    assert len(sources) == after_first
    (eager, eager_weights), (got, got_weights) = runs
    for want, have in zip(eager, got):
        for k, v in want.items():
            torch.testing.assert_close(have[k], v, rtol=1e-6, atol=1e-7, msg=k)
    for k, v in eager_weights.items():
        torch.testing.assert_close(got_weights[k], v, rtol=1e-5, atol=1e-6, msg=k)
