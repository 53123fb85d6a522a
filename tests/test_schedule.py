"""The learning-rate schedule: the reference's numbers, a non-zero floor (optim.min_lr), every parameter
group following it, and the logged train/lr. The reference configs use min_lr 0, so test_lr_schedule
cannot see a schedule that ignores the floor."""
import math

import ml_collections
import pytest

import trainstep
from configs import vitb32
from helpers import SMOKE, scalars
from tiny_step import one_thread, step, tiny_state  # noqa: F401  (one_thread: a fixture)

pytestmark = pytest.mark.usefixtures('one_thread')

OPTIM = ml_collections.ConfigDict(dict(base_lr=1e-4, warmup_lr=1e-3, min_lr=2.5e-4, warmup_steps=11))
MAX_ITER = 111


def spec_lr(t, base=1e-4, peak=1e-3, floor=0, warmup=2500, max_iter=128001):
    """The reference's CosineLRScheduler with eta_min = floor: linear warm-up from base
    to peak over t = 1 .. warmup - 1, then cosine from peak at t = warmup to floor at max_iter.
    The defaults are the reference's own numbers: 1e-4 -> 1e-3 over 2,500 steps, cosine to 0 at 128,001."""
    if t < warmup:
        return base + (peak - base) * (t - 1) / (warmup - 1)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (max_iter - warmup)))


def test_cosine_ends_at_min_lr_and_is_half_way_between_peak_and_floor_mid_way():
    """Breaks it catches: the cosine written without min_lr (decaying to 0), or min_lr added on
    top of the peak-to-zero cosine."""
    lr = lambda t: trainstep.lr_at(t, OPTIM, MAX_ITER)  # noqa: E731
    assert lr(MAX_ITER) == pytest.approx(2.5e-4, rel=1e-12)
    assert lr(61) == pytest.approx((1e-3 + 2.5e-4) / 2, rel=1e-12)       # (61 - 11) / (111 - 11) = 1/2
    assert lr(11) == pytest.approx(1e-3, rel=1e-12)                       # the peak, where the cosine starts
    assert lr(36) == pytest.approx(2.5e-4 + 7.5e-4 * (0.5 + 0.5 * math.sqrt(0.5)), rel=1e-12)  # a quarter


def test_warmup_starts_at_base_lr_whatever_the_floor():
    """Break it catches: the warm-up ramp starting from min_lr instead of base_lr."""
    lr = lambda t: trainstep.lr_at(t, OPTIM, MAX_ITER)  # noqa: E731
    assert lr(1) == pytest.approx(1e-4, rel=1e-12)
    assert lr(6) == pytest.approx(1e-4 + 9e-4 * 5 / 10, rel=1e-12)
    assert lr(10) == pytest.approx(1e-4 + 9e-4 * 9 / 10, rel=1e-12)


@pytest.mark.parametrize('base, peak, floor, warmup, max_iter', [
    (1e-4, 1e-3, 2.5e-4, 11, 111), (5e-5, 4e-4, 1e-5, 3, 20), (0.0, 1e-3, 1e-3 / 7, 50, 1000)])
def test_every_step_against_the_closed_form(base, peak, floor, warmup, max_iter):
    """Each t of a run against spec_lr. Break it catches: any change of the two formulas (the
    warm-up divisor warmup instead of warmup - 1, progress measured from t = 0, the floor ignored)."""
    optim = ml_collections.ConfigDict(dict(base_lr=base, warmup_lr=peak, min_lr=floor, warmup_steps=warmup))
    for t in range(1, max_iter + 1):
        want = spec_lr(t, base, peak, floor, warmup, max_iter)
        assert trainstep.lr_at(t, optim, max_iter) == pytest.approx(want, rel=1e-12, abs=1e-18), t


def test_every_parameter_group_gets_the_scheduled_lr():
    """After step t both AdamW groups (decay and no decay) carry lr_at(t) (at t = 2, 3 the warm-up
    has left base_lr). Break it catches: the schedule written into param_groups[0] only."""
    cfg, state, batch = tiny_state()
    cfg.optim.update(dict(warmup_steps=3, min_lr=1e-5))
    cfg.max_iter = 6
    seen = []
    for t in range(1, 5):
        step(state, batch, cfg)
        seen.append([g['lr'] for g in state.optimizer.param_groups])
    want = [trainstep.lr_at(t, cfg.optim, cfg.max_iter) for t in range(1, 5)]
    assert len(set(want)) == 4 and want[0] == cfg.optim.base_lr
    assert seen == [[w, w] for w in want]


@pytest.mark.parametrize('t', [1, 2, 1250, 2499, 2500, 2501, 10_000, 64_000, 128_000, 128_001])
def test_lr_schedule(t):
    cfg = vitb32.get_config()
    assert trainstep.lr_at(t, cfg.optim, cfg.max_iter) == pytest.approx(spec_lr(t), rel=1e-12, abs=1e-15)


def test_logged_lr_is_the_schedule(full_run):
    """train/lr of step t is lr_at(t): the first and the last step of the smoke run (and all between)."""
    cfg = SMOKE
    first, last = trainstep.lr_at(1, cfg.optim, cfg.max_iter), trainstep.lr_at(cfg.max_iter, cfg.optim, cfg.max_iter)
    assert len({first, last, cfg.optim.warmup_lr}) == 3
    lrs, _ = scalars(full_run, 'train/lr')
    assert sorted(lrs) == list(range(1, cfg.max_iter + 1))
    assert lrs[1] == pytest.approx(first, rel=1e-6) and lrs[cfg.max_iter] == pytest.approx(last, rel=1e-6, abs=1e-12)
    for step, value in lrs.items():
        assert value == pytest.approx(trainstep.lr_at(step, cfg.optim, cfg.max_iter), rel=1e-6, abs=1e-12), step
