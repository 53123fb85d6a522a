"""A sample's time is bounded (data.limits.sample_timeout_s), leaving signal handlers and other threads alone."""
import signal
import threading
import time

import pytest

import guard
from helpers import bad_totals, data_config, one_pass, write_jpeg, write_meta


@pytest.mark.parametrize('workers', [0, 2])
def test_a_sample_that_hangs_is_cut_off_and_counted(tmp_path, monkeypatch, workers):
    """A read that never ends (here: a 60 s sleep) costs data.limits.sample_timeout_s, in a loader worker
    and in the main process alike; the main process's SIGALRM handler and timer are as before."""
    write_jpeg(tmp_path / 'good.jpg')
    write_jpeg(tmp_path / 'slow.jpg')
    write_meta(tmp_path / 'meta.jsonl', [{'filename': n, 'caption': 'a cat'} for n in ['slow.jpg'] + ['good.jpg'] * 3])
    real = guard.read_bytes

    def read_bytes(source, **kwargs):
        if str(source).endswith('slow.jpg'):
            time.sleep(60)
        return real(source, **kwargs)
    monkeypatch.setattr(guard, 'read_bytes', read_bytes)

    def mine(*_):
        pass
    previous = signal.signal(signal.SIGALRM, mine)
    try:
        cfg = data_config(train_root=str(tmp_path), train_meta=str(tmp_path / 'meta.jsonl'), workers=workers,
                          batch_size=4, bad_window=1000, sample_timeout_s=0.5)
        start = time.monotonic()
        counts = bad_totals(one_pass(cfg, 8))
        assert time.monotonic() - start < 30
        assert set(counts) == {'timeout'} and counts['timeout'] >= 2        # two passes over the slow one
        assert signal.getsignal(signal.SIGALRM) is mine and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    finally:
        signal.signal(signal.SIGALRM, previous)


def test_time_limit_restores_the_handler_and_leaves_other_threads_alone():
    def mine(*_):
        pass
    previous = signal.signal(signal.SIGALRM, mine)
    try:
        with pytest.raises(guard.BadSample, match='timeout'):
            with guard.time_limit(0.2):
                time.sleep(5)
        assert signal.getsignal(signal.SIGALRM) is mine and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        with guard.time_limit(5):
            pass
        assert signal.getsignal(signal.SIGALRM) is mine
        result = []

        def elsewhere():  # no signals off the main thread: no limit, and no error
            with guard.time_limit(0.1):
                time.sleep(0.3)
            result.append('done')
        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        assert result == ['done']
    finally:
        signal.signal(signal.SIGALRM, previous)
