"""data.limits.bad_window and data.limits.max_bad_rate: the loader stops with a DataError when more than
max_bad_rate of the last bad_window samples could not be built: only once that many samples were
tried, only above the rate (not at it), and over the last window only (old failures leave it)."""
import pytest

import guard


def feed(monitor, pattern, start=0):
    """Record a sample per character: 'x' a failure (named by its index from `start`), '.' a success."""
    for i, c in enumerate(pattern, start):
        monitor.record(f'sample {i}' if c == 'x' else None)


def test_no_stop_before_the_window_is_full():
    """9 failures in the first 9 samples of a 10-sample window: no decision yet. Break it catches:
    the rate judged on a window that is not full (a corpus's first bad file would stop the run)."""
    feed(guard.FailureMonitor(10, 0.3), 'x' * 9)


def test_a_rate_at_the_limit_goes_on_and_above_it_stops():
    """3 failures in the last 10 at a limit of 0.3 go on; a 4th within the window stops, naming the
    rate, the window and the latest failure. Break it catches: >= instead of >."""
    monitor = guard.FailureMonitor(10, 0.3)
    feed(monitor, '.' * 10 + '..x..x..x.')
    with pytest.raises(guard.DataError, match=r'(?s)40% of the last 10 samples.*sample 20'):
        feed(monitor, 'x', start=20)


def test_only_the_last_window_counts():
    """Early failures leave the window: 9 failures, then 60 good samples, then 4 in the last 10
    (13 of 83 overall, 16 %) stop at a limit of 0.3; 9 failures then 60 good then 3 in 10 do not.
    Break it catches: a window that keeps every sample (a deque without maxlen)."""
    feed(guard.FailureMonitor(10, 0.3), 'x' * 9 + '.' * 60 + 'x..x..x...')
    with pytest.raises(guard.DataError, match='40% of the last 10'):
        feed(guard.FailureMonitor(10, 0.3), 'x' * 9 + '.' * 60 + 'x..x..x..x')
