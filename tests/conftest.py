import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo')
    import prepare
    prepare.make_demo(out, train=240, val=60, workers=2)
    return out


