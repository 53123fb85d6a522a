"""config.runtime.max_nonfinite counts consecutive skipped steps: a good step resets the count, so skips
scattered among good steps never stop a run, and a streak of max_nonfinite does, at its last step.
Non-finite losses come from a wrapped losses.declip_loss (tiny_step.nonfinite_at); after every
step the test applies the loop's own stop rule (lifecycle.stop_if_diverged, as at log_every=1), and
one whole run goes through train.train."""
import pytest

import checkpoints
import lifecycle
import train
from configs import demo
from helpers import scalars
from tiny_step import nonfinite_at, one_thread, step, tiny_state  # noqa: F401  (one_thread: a fixture)

pytestmark = pytest.mark.usefixtures('one_thread')


def run_steps(monkeypatch, tmp_path, pattern, max_nonfinite):
    """Steps with a NaN loss where `pattern` is True, each followed by the stop rule; returns
    ([(skipped, consecutive count)] of the steps done, the SystemExit if the rule stopped the run)."""
    cfg, state, batch = tiny_state(batch=4)
    cfg.runtime.max_nonfinite = max_nonfinite
    nonfinite_at(monkeypatch, pattern)
    seen = []
    for _ in pattern:
        metrics = step(state, batch, cfg)
        seen.append((int(metrics['skipped']), int(state.nonfinite_run)))
        try:
            lifecycle.stop_if_diverged(state, cfg, tmp_path)
        except SystemExit as e:
            return seen, e, state
    return seen, None, state


def test_scattered_skips_never_stop_the_run(monkeypatch, tmp_path):
    """skip, good, skip, good, ... (each skip alone, 4 of them) with max_nonfinite=2: the count
    goes 1, 0, 1, 0, ... and the run goes on; the total still counts every skip. Break it
    catches: a count that a good step does not reset (nonfinite_run += skip)."""
    pattern = [True, False] * 4
    seen, stopped, state = run_steps(monkeypatch, tmp_path, pattern, max_nonfinite=2)
    assert stopped is None
    assert seen == [(1, 1), (0, 0)] * 4
    assert int(state.nonfinite_total) == 4 and state.step == 8


def test_a_streak_of_max_nonfinite_stops_at_its_last_step(monkeypatch, tmp_path):
    """good, skip, skip, good, skip, skip, skip with max_nonfinite=3: two skips in a row are
    tolerated, the third consecutive one stops the run at step 7 with the message naming the
    streak. Breaks it catches: the rule comparing with > instead of >=, or reading the total
    (5 skips would then stop at step 5)."""
    pattern = [False, True, True, False, True, True, True]
    seen, stopped, _ = run_steps(monkeypatch, tmp_path, pattern, max_nonfinite=3)
    assert seen == [(0, 0), (1, 1), (1, 2), (0, 0), (1, 1), (1, 2), (1, 3)]
    assert stopped is not None
    assert '3 consecutive non-finite losses at step 7' in str(stopped) and 'max_nonfinite=3' in str(stopped)


def test_max_nonfinite_one_stops_at_the_first_skip(monkeypatch, tmp_path):
    """good, good, skip with max_nonfinite=1: the first skipped step stops the run. Break it
    catches: an off-by-one in the rule (run_len > max_nonfinite)."""
    seen, stopped, _ = run_steps(monkeypatch, tmp_path, [False, False, True], max_nonfinite=1)
    assert seen == [(0, 0), (0, 0), (1, 1)] and stopped is not None
    assert '1 consecutive non-finite losses at step 3' in str(stopped)


def test_a_run_with_scattered_skips_trains_to_the_end(monkeypatch, tmp_path, demo_dir):
    """train.train on the demo corpus, 8 steps, log_every=1, max_nonfinite=2, every other step's
    loss NaN: the run ends normally at step 8 with its checkpoint; 4 steps are counted skipped
    and the logged count grows by one at each odd step. Break it catches: the count not reset by
    a good step (the run would stop at step 3)."""
    cfg = demo.get_config('smoke')
    cfg.data.update(dict(train_root=str(demo_dir / 'train'), train_meta=str(demo_dir / 'train.jsonl'), val_meta=''))
    cfg.update(dict(max_iter=8, log_every=1, ckpt_every=8, keep_every=8))
    cfg.runtime.update(dict(max_nonfinite=2, compile='false', tb_images=0))
    nonfinite_at(monkeypatch, [True, False] * 4)
    train.train(cfg, tmp_path)
    last = checkpoints.safe_load(tmp_path / 'checkpoints' / 'last.pt')
    assert last['step'] == 8 and last['nonfinite_total'] == 4
    counted, _ = scalars(tmp_path, 'train/nonfinite_steps')
    assert counted == {t: float((t + 1) // 2) for t in range(1, 9)}
