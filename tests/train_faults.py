"""train.py with faults injected from outside, for tests that run training in a subprocess (alone or
under torchrun): `python tests/train_faults.py <train.py's arguments>` patches the library, then
runs train.py as __main__. The faults come from the environment:

    DECLIP_TEST_NONFINITE_STEPS=2,5     the loss of those (0-based) steps is NaN (both step variants)
    DECLIP_TEST_PAUSE_BEFORE_RENAME=60  each checkpoint write waits 60 s between its fsync and rename
    DECLIP_TEST_STALL_AT_BATCH=4        a loader worker never returns its batch 4 (0-based, its own count)
"""
import os
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def nonfinite_at(steps):
    """losses.weighted_total, which both step variants sum the objective with, returns NaN during
    the given steps: the backward then carries NaN gradients, as a real overflow would."""
    import accum
    import losses
    import trainstep
    current, real_total = {}, losses.weighted_total

    def weighted_total(terms, weights):
        total = real_total(terms, weights)
        return total * float('nan') if current.get('step') in steps else total
    for module in (trainstep, accum):
        def step(state, batch, cfg, real=module.train_step):
            current['step'] = state.step
            return real(state, batch, cfg)
        module.train_step = step
    losses.weighted_total = weighted_total


def pause_before_rename(seconds):
    """os.replace of a *.tmp file (checkpoints.save_checkpoint's rename after its fsync) sleeps first."""
    real = os.replace

    def replace(src, dst, **kwargs):
        if str(src).endswith('.tmp'):
            time.sleep(seconds)
        return real(src, dst, **kwargs)
    os.replace = replace


def stall_at_batch(index):
    """data.Collate, which a loader worker runs on each batch after its samples are built (outside the
    per-sample time limit), never returns for the worker's batch `index`: a worker that stops responding."""
    import threading

    import data
    real, made = data.Collate.__call__, []

    def collate(self, samples):
        made.append(1)
        if len(made) == index + 1:
            threading.Event().wait()
        return real(self, samples)
    data.Collate.__call__ = collate


if __name__ == '__main__':
    sys.path.insert(0, str(ROOT))
    if os.environ.get('DECLIP_TEST_NONFINITE_STEPS'):
        nonfinite_at({int(s) for s in os.environ['DECLIP_TEST_NONFINITE_STEPS'].split(',')})
    if os.environ.get('DECLIP_TEST_PAUSE_BEFORE_RENAME'):
        pause_before_rename(float(os.environ['DECLIP_TEST_PAUSE_BEFORE_RENAME']))
    if os.environ.get('DECLIP_TEST_STALL_AT_BATCH'):
        stall_at_batch(int(os.environ['DECLIP_TEST_STALL_AT_BATCH']))
    sys.argv[0] = str(ROOT / 'train.py')
    runpy.run_path(str(ROOT / 'train.py'), run_name='__main__')
