"""A training step of the tiny DeCLIP of helpers.tiny_config on a synthetic batch, for tests that
look at what one step does (learning rates, gradients, counters), and non-finite losses injected
from the test."""
import contextlib

import pytest
import torch

import accum
import losses
import trainstep
from helpers import tiny_config
from tools import bench

CPU = torch.device('cpu')


@contextlib.contextmanager
def single_thread():
    """One intra-op thread inside (a model this small gains nothing from more, and on a shared
    machine a second thread that waits for a busy core makes each step ~10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    with single_thread():
        yield


def tiny_state(batch=8, accum_steps=1, **loss_weights):
    """(config, fresh TrainState, synthetic batch) of helpers.tiny_config with `accum_steps`
    micro-batches a step and the given loss weights."""
    cfg = tiny_config()
    cfg.accum_steps = accum_steps
    with cfg.unlocked():  # a test may weight a term the config does not know yet
        cfg.loss.update(loss_weights)
    return cfg, trainstep.build_state(cfg, CPU), bench._synthetic_batch(cfg, batch, CPU)


def step(state, batch, cfg):
    """The step the loop runs for `cfg` (accum.train_step with accum_steps > 1)."""
    return (accum.train_step if cfg.accum_steps > 1 else trainstep.train_step)(state, batch, cfg)


def keep_gradients(state):
    """The optimiser no longer steps nor clears gradients: a step leaves its gradients in .grad."""
    state.optimizer.step = lambda: None
    state.optimizer.zero_grad = lambda set_to_none=True: None


def gradients(state):
    """{name: gradient} of the parameters that have one."""
    return {k: p.grad.clone() for k, p in state.model.named_parameters() if p.grad is not None}


def nonfinite_at(monkeypatch, pattern):
    """declip_loss returns a NaN total on the calls (one per step) where `pattern` says True; the
    pattern is consumed one entry per call, good losses once it is used up."""
    real, pending = losses.declip_loss, list(pattern)

    def declip_loss(*args, **kwargs):
        total, terms, keys = real(*args, **kwargs)
        bad = pending.pop(0) if pending else False
        return (total * float('nan') if bad else total), terms, keys
    monkeypatch.setattr(losses, 'declip_loss', declip_loss)
