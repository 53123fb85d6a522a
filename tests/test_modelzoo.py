"""The ModelZoo launch scripts in modelzoo/, run by the port's names in test/: the ./dataset layout, a
fresh output folder per performance run and a resumed one per full-run relaunch, the case log, loss
file and weights, --data_path, CANN discovery, clear errors; test/ only hands over to modelzoo/. The
scripts work in the repository they sit in, so every test runs them in a copy of the code: the real
dataset/, checkpoint/ and test/output/ stay untouched."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
from tools import prepare

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ('train_full_1p', 'train_full_8p', 'train_performance_1p', 'train_performance_8p')
PERF_KEYS = ['Network', 'RankSize', 'BatchSize', 'DeviceType', 'CaseName', 'ActualFPS', 'TrainingTime',
             'ActualLoss', 'E2ETrainingTime']
ACC_KEYS = PERF_KEYS[:-1] + ['TrainAccuracy', 'E2ETrainingTime']


@pytest.fixture
def repo(tmp_path):
    """A copy of the code with data/ linked, where the scripts may write."""
    copy = tmp_path / 'repo'
    copy.mkdir()
    for path in ROOT.glob('*.py'):
        shutil.copy2(path, copy)
    for folder in ('configs', 'assets', 'modelzoo', 'test', 'tools'):
        shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns('__pycache__', 'output'))
    (copy / 'data').symlink_to(data.DATA_DIR)
    return copy


@pytest.fixture(scope='module')
def dataset(tmp_path_factory, demo_dir):
    out = tmp_path_factory.mktemp('modelzoo') / 'yfcc'
    prepare.modelzoo_dataset(out, demo=demo_dir)
    return out


def test_modelzoo_dataset_layout(dataset, demo_dir):
    """The demo corpus under the ModelZoo names: same images, validation renamed in meta order."""
    demo_val = [json.loads(line) for line in (demo_dir / 'val.jsonl').read_text().splitlines()]
    val = [json.loads(line) for line in (dataset / 'val_official.json').read_text().splitlines()]
    assert [r['filename'] for r in val] == [f'ILSVRC2012_val_{i:08d}.JPEG' for i in range(1, len(demo_val) + 1)]
    assert [(r['label'], r['label_name']) for r in val] == [(r['label'], r['label_name']) for r in demo_val]
    assert sorted(p.name for p in (dataset / 'imagenet_val').iterdir()) == [r['filename'] for r in val]
    renamed, original = dataset / 'imagenet_val' / val[7]['filename'], demo_dir / 'val' / demo_val[7]['filename']
    assert renamed.read_bytes() == original.read_bytes()
    assert (dataset / 'yfcc15m_clean_open_data.json').read_text() == (demo_dir / 'train.jsonl').read_text()
    train_names = [json.loads(line)['filename'] for line in (demo_dir / 'train.jsonl').read_text().splitlines()]
    assert sorted(p.name for p in (dataset / 'yfcc15m_clean_open_data').iterdir()) == sorted(train_names)
    assert (dataset / data.BPE_PATH.name).read_bytes() == data.BPE_PATH.read_bytes()
    with pytest.raises(SystemExit, match='not empty'):
        prepare.modelzoo_dataset(dataset, demo=demo_dir)
    with pytest.raises(SystemExit, match=f'{dataset}/train.jsonl not found'):
        prepare.modelzoo_dataset(dataset / 'new', demo=dataset)


def script(cwd, path, *args, **env):
    """Run a launch script (bash, tiny config, no CANN, no device choice inherited) in `cwd`."""
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ('ASCEND_DEVICE_ID', 'ASCEND_RT_VISIBLE_DEVICES', 'ASCEND_HOME_PATH', 'ASCEND_TOOLKIT_HOME')}
    env = {**inherited, 'DECLIP_CONFIG': 'configs/vitb32.py:smoke', 'OMP_NUM_THREADS': '1',
           'CANN_ENV': '/nonexistent/set_env.sh', **env}
    proc = subprocess.Popen(['bash', str(path), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and train.py too, not only bash
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def case_log(path):
    pairs = [line.split(' = ', 1) for line in path.read_text().splitlines()]
    return {k: v for k, v in pairs}, [k for k, _ in pairs]


def check_outputs(out, case, *, batch, nproc, windows, acc):
    """The case log against the training log it summarises; returns the case log."""
    log = (out / f'train_{out.name}.log').read_text()
    values, keys = case_log(out / f'{case}.log')
    assert keys == (ACC_KEYS if acc else PERF_KEYS)
    assert values['Network'] == 'DeCLIP_for_PyTorch' and values['CaseName'] == case
    assert (values['RankSize'], values['BatchSize']) == (str(nproc), str(batch))
    fps = [float(x) for x in re.findall(r'\| ([0-9.]+) img/s', log)]
    assert len(fps) == windows
    assert float(values['ActualFPS']) > 0
    launches = re.split(r'^device .* \| backend .*$', log, flags=re.M)     # each launch's first window: start-up
    later = [float(x) for part in launches for x in re.findall(r'\| ([0-9.]+) img/s', part)[1:]]
    assert float(values['ActualFPS']) == pytest.approx(sum(later) / len(later), abs=0.006)
    assert float(values['TrainingTime']) == pytest.approx(batch * nproc * 1000 / float(values['ActualFPS']), rel=1e-3)
    losses = [float(x) for x in (out / f'train_{case}_loss.txt').read_text().split()]
    assert losses == [float(x) for x in re.findall(r'img/s \|.* total ([-0-9.e+na]+)', log)]
    assert len(losses) == windows and all(math.isfinite(v) for v in losses)
    assert float(values['ActualLoss']) == losses[-1]
    assert int(values['E2ETrainingTime']) >= 0
    if acc:
        assert float(values['TrainAccuracy']) == float(re.findall(r'zero-shot top-1 ([0-9.]+)', log)[-1])
    return values


def test_performance_run_twice_from_dataset_folder(repo, demo_dir):
    """`python tools/prepare.py modelzoo-dataset` fills ./dataset; two performance runs in a row (from
    the root, then from test/) each train from step 0 and report a real speed."""
    subprocess.run([sys.executable, 'tools/prepare.py', 'modelzoo-dataset', '--demo', str(demo_dir)], cwd=repo,
                   check=True, capture_output=True, timeout=120)
    assert (repo / 'dataset' / 'imagenet_val' / 'ILSVRC2012_val_00000001.JPEG').is_file()
    out, case = repo / 'test' / 'output' / '0', 'DeCLIP_for_PyTorch_bs8_1p_perf'
    for name, cwd in (('test/train_performance_1p.sh', repo), ('train_performance_1p.sh', repo / 'test')):
        done = script(cwd, name, '--config.max_iter=8', '--config.log_every=2')
        assert done.returncode == 0, done.stdout + done.stderr
        assert 'resumed' not in done.stdout + done.stderr
        assert sorted(p.name for p in out.iterdir()) == sorted(
            [f'{case}.log', 'train_0.log', f'train_{case}_loss.txt', 'workdir'])
        check_outputs(out, case, batch=8, nproc=1, windows=4, acc=False)
        weights = torch.load(repo / 'checkpoint' / f'{case}.pt', weights_only=True)
        assert weights['step'] == 8
        assert weights['config']['data']['bpe_path'] == str(repo / 'dataset' / data.BPE_PATH.name)


def test_data_path_overrides_dataset_folder(repo, dataset, tmp_path):
    """--data_path (relative to where the command runs) wins over ./dataset, here a broken one; a
    full run reports its accuracy; ASCEND_DEVICE_ID names the output folder."""
    (repo / 'dataset').mkdir()
    relative = os.path.relpath(dataset, tmp_path)
    done = script(tmp_path, repo / 'test/train_full_1p.sh', f'--data_path={relative}', '--config.max_iter=4',
                  '--config.log_every=2', ASCEND_DEVICE_ID='3')
    assert done.returncode == 0, done.stdout + done.stderr
    out, case = repo / 'test' / 'output' / '3', 'DeCLIP_for_PyTorch_bs8_1p_acc'
    assert (out / 'train_3.log').is_file() and not (repo / 'test' / 'output' / '0').exists()
    check_outputs(out, case, batch=8, nproc=1, windows=2, acc=True)
    assert 'Final Train Accuracy : ' in done.stdout
    weights = torch.load(repo / 'checkpoint' / f'{case}.pt', weights_only=True)
    assert weights['config']['data']['train_meta'] == str(dataset / 'yfcc15m_clean_open_data.json')
    assert weights['config']['data']['val_root'] == str(dataset / 'imagenet_val')


@pytest.mark.parametrize('name', SCRIPTS)
def test_missing_dataset_is_a_clear_error(repo, name):
    done = script(repo, f'test/{name}.sh')
    assert done.returncode == 2
    assert f'dataset folder not found: {repo / "dataset"}' in done.stderr
    assert 'Traceback' not in done.stdout + done.stderr
    assert not (repo / 'test' / 'output').exists()


def test_incomplete_dataset_and_bad_device_id_are_clear_errors(repo):
    (repo / 'dataset').mkdir()
    (repo / 'dataset' / 'yfcc15m_clean_open_data.json').write_text('')
    done = script(repo, 'test/train_full_1p.sh')
    assert done.returncode != 0 and 'Traceback' not in done.stderr
    for item in ('yfcc15m_clean_open_data/', 'val_official.json', 'imagenet_val/'):
        assert f'dataset folder {repo / "dataset"} has no {item}' in done.stderr
    assert 'yfcc15m_clean_open_data.json' not in done.stderr
    done = script(repo, 'test/train_performance_1p.sh', ASCEND_DEVICE_ID='../..')
    assert done.returncode != 0 and "ASCEND_DEVICE_ID must be a card number, got '../..'" in done.stderr


FAKE_PYTHON = r'''#!/usr/bin/env bash
# stands in for python: `python -` is the batch query, `python -m torch.distributed.run` a run
[ "$1" = - ] && { echo 16; exit 0; }
echo "ARGS $*"
echo "VISIBLE ${ASCEND_RT_VISIBLE_DEVICES-unset} AUTOLOAD ${TORCH_DEVICE_BACKEND_AUTOLOAD-unset}"
echo "device npu:0 | backend hccl | precision torch.bfloat16 | world size 1 | static shapes False"
while [ "$1" != --workdir ]; do shift; done
[ -f "$2/checkpoints/last.pt" ] && echo "RESUMES FROM $(cat "$2/checkpoints/last.pt")"
mkdir -p "$2/checkpoints" && echo "weights of launch $$" > "$2/checkpoints/last.pt"
for fps in 10.0 100.0 200.0 600.0; do echo "step 1/9 | eta 0:00:01 | $fps img/s | lr 1e-3 | total 2.5 clip 1.0"; done
echo 'step 4: zero-shot top-1 12.50 top-5 50.00 (60 images)'
exit "${FAKE_STATUS:-0}"
'''


@pytest.fixture
def fake_cann(tmp_path):
    """A CANN set_env.sh that puts a stand-in python first on PATH (no training, no torch)."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'python').write_text(FAKE_PYTHON)
    (bin_dir / 'python').chmod(0o755)
    env = tmp_path / 'set_env.sh'
    env.write_text(f'export PATH={bin_dir}:$PATH\nexport FAKE_CANN_LOADED=1\n')
    return env


@pytest.mark.parametrize('name, nproc', [('train_performance_8p', 8), ('train_full_8p', 8), ('train_full_1p', 1)])
def test_launch_flags_and_summary(repo, dataset, fake_cann, name, nproc):
    """What each script hands torchrun, in order (data flags, then the script's, then the user's),
    and the summary of a known log: the first window dropped, the rest averaged."""
    done = script(repo, f'test/{name}.sh', f'--data_path={dataset}', '--config.seed=5', CANN_ENV=str(fake_cann),
                  ASCEND_DEVICE_ID='2', ASCEND_RT_VISIBLE_DEVICES='0,1')
    assert done.returncode == 0, done.stdout + done.stderr
    kind = 'perf' if 'performance' in name else 'acc'
    case, out = f'DeCLIP_for_PyTorch_bs16_{nproc}p_{kind}', repo / 'test' / 'output' / '2'
    args = re.search(r'^ARGS (.*)$', done.stdout, re.M).group(1).split()
    assert args[:6] == ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc), 'train.py']
    assert args[6:10] == ['--config', 'configs/vitb32.py:smoke', '--workdir', str(out / 'workdir')]
    expected = [f'--config.data.train_meta={dataset}/yfcc15m_clean_open_data.json',
                f'--config.data.train_root={dataset}/yfcc15m_clean_open_data',
                f'--config.data.val_meta={dataset}/val_official.json',
                f'--config.data.val_root={dataset}/imagenet_val',
                f'--config.data.bpe_path={dataset}/{data.BPE_PATH.name}']
    expected += ['--config.stop_at=1000'] * (kind == 'perf') + ['--config.seed=5']
    assert args[10:] == expected
    # on an Ascend host ASCEND_DEVICE_ID picks the card of a 1-device run; 8-device runs see all
    visible = '2' if nproc == 1 else '0,1'
    assert f'VISIBLE {visible} AUTOLOAD unset' in done.stdout
    values = check_outputs(out, case, batch=16, nproc=nproc, windows=4, acc=kind == 'acc')
    assert values['ActualFPS'] == '300.00'
    assert (repo / 'checkpoint' / f'{case}.pt').read_text().startswith('weights of launch')


def test_a_full_run_relaunch_resumes_and_only_start_fresh_starts_over(repo, dataset, fake_cann):
    """Relaunching a full run keeps its checkpoints (train.py resumes from them) and appends to its
    log, whose summary drops the first window of each launch; --start_fresh empties the folder; a
    performance run always starts over."""
    out = repo / 'test' / 'output' / '0'
    first = script(repo, 'test/train_full_1p.sh', f'--data_path={dataset}', CANN_ENV=str(fake_cann))
    assert first.returncode == 0 and 'RESUMES FROM' not in first.stdout, first.stdout + first.stderr
    again = script(repo, 'test/train_full_1p.sh', f'--data_path={dataset}', CANN_ENV=str(fake_cann))
    assert again.returncode == 0, again.stdout + again.stderr
    assert 'RESUMES FROM weights of launch' in again.stdout
    values = check_outputs(out, 'DeCLIP_for_PyTorch_bs16_1p_acc', batch=16, nproc=1, windows=8, acc=True)
    assert values['ActualFPS'] == '300.00'          # 10 and 10: each launch's first window, dropped
    fresh = script(repo, 'test/train_full_1p.sh', f'--data_path={dataset}', '--start_fresh', CANN_ENV=str(fake_cann))
    assert fresh.returncode == 0 and 'RESUMES FROM' not in fresh.stdout and '--start_fresh' not in fresh.stdout
    check_outputs(out, 'DeCLIP_for_PyTorch_bs16_1p_acc', batch=16, nproc=1, windows=4, acc=True)
    for _ in range(2):
        perf = script(repo, 'test/train_performance_1p.sh', f'--data_path={dataset}', CANN_ENV=str(fake_cann))
        assert perf.returncode == 0 and 'RESUMES FROM' not in perf.stdout


def test_exit_status_is_the_trainings(repo, dataset, fake_cann):
    """A failed run keeps its status, writes its summary and copies no weights."""
    done = script(repo, 'test/train_performance_1p.sh', f'--data_path={dataset}', CANN_ENV=str(fake_cann),
                  FAKE_STATUS='3', DECLIP_CONFIG='')
    assert done.returncode == 3
    assert ' train.py --config configs/vitb32.py --workdir ' in done.stdout  # the default config
    assert 'VISIBLE 0 AUTOLOAD unset' in done.stdout  # no card named: the first
    assert (repo / 'test' / 'output' / '0' / 'DeCLIP_for_PyTorch_bs16_1p_perf.log').is_file()
    assert not (repo / 'checkpoint').exists()


def _sourced(env_npu, command, **env):
    """What `command` prints after sourcing env_npu.sh in a clean environment plus `env`."""
    clean = {k: v for k, v in os.environ.items() if k not in (
        'CANN_ENV', 'ASCEND_HOME_PATH', 'ASCEND_TOOLKIT_HOME', 'CPU_AFFINITY_CONF', 'TORCH_DEVICE_BACKEND_AUTOLOAD',
        'TASK_QUEUE_ENABLE')}
    return subprocess.run(['bash', '-c', f'source {env_npu}; {command}'], capture_output=True, text=True,
                          env={**clean, **env}, check=True).stdout.strip('\n')


def test_the_port_names_in_test_only_hand_over_to_modelzoo():
    """test/ holds the port's five names and nothing else (but the ignored output/); each is one
    command running (env_npu.sh: sourcing) the modelzoo/ script of the same name with the same arguments."""
    names = (*SCRIPTS, 'env_npu')
    assert sorted(p.name for p in (ROOT / 'test').iterdir() if p.name != 'output') == sorted(f'{n}.sh' for n in names)
    for name in names:
        code = [line for line in (ROOT / 'test' / f'{name}.sh').read_text().splitlines()
                if line.strip() and not line.startswith('#')]
        command = 'source' if name == 'env_npu' else 'exec bash'
        arguments = '' if name == 'env_npu' else ' "$@"'
        assert code == [f'{command} "$(dirname "${{BASH_SOURCE[0]}}")/../modelzoo/{name}.sh"{arguments}'], name
        assert 'modelzoo_main' in (ROOT / 'modelzoo' / f'{name}.sh').read_text(), name


def test_a_modelzoo_script_run_directly_equals_its_port_name(repo, dataset, fake_cann):
    """modelzoo/train_performance_1p.sh, run from the root and from modelzoo/, does what
    test/train_performance_1p.sh does: the same torchrun command in the root, the same files in
    test/output/0/, the same case log but for its wall time, the weights in ./checkpoint/."""
    out, case = repo / 'test' / 'output' / '0', 'DeCLIP_for_PyTorch_bs16_1p_perf'
    seen = []
    for cwd, path in ((repo, 'test/train_performance_1p.sh'), (repo, 'modelzoo/train_performance_1p.sh'),
                      (repo / 'modelzoo', 'train_performance_1p.sh')):
        done = script(cwd, path, f'--data_path={dataset}', '--config.seed=5', CANN_ENV=str(fake_cann))
        assert done.returncode == 0, done.stdout + done.stderr
        launch = re.findall(r'^(?:ARGS|VISIBLE) .*$', done.stdout, re.M)
        values, keys = case_log(out / f'{case}.log')
        del values['E2ETrainingTime']
        seen.append((launch, sorted(p.name for p in out.iterdir()), keys, values))
        assert (repo / 'checkpoint' / f'{case}.pt').read_text().startswith('weights of launch')
        (repo / 'checkpoint' / f'{case}.pt').unlink()
    assert seen[0] == seen[1] == seen[2]
    assert f'--workdir {out / "workdir"} ' in seen[0][0][0] and seen[0][0][0].endswith(' --config.seed=5')
    assert seen[0][3]['ActualFPS'] == '300.00'


def test_cann_environment(tmp_path, fake_cann):
    """CANN from its install record (cann/ of CANN >= 8.5, ascend-toolkit/, nnae/), else from
    $HOME/Ascend; an environment that already has CANN is Ascend; without CANN torch_npu is not
    auto-loaded."""
    env_npu = ROOT / 'test' / 'env_npu.sh'
    home = tmp_path / 'home'
    for layout in ('ascend-toolkit', 'nnae', 'cann'):
        install = tmp_path / layout / 'Ascend'
        for name in ('nnae', 'ascend-toolkit', 'cann')[:('nnae', 'ascend-toolkit', 'cann').index(layout) + 1]:
            (install / name).mkdir(parents=True, exist_ok=True)
            (install / name / 'set_env.sh').write_text('')
        info = tmp_path / layout / 'ascend_cann_install.info'
        info.write_text(f'Install_Path={install}\nVersion=8.0\n')
        found = _sourced(env_npu, f'cann_env_script {info}', CANN_ENV='/nonexistent', HOME=str(home))
        assert found == str(install / layout / 'set_env.sh')
    (home / 'Ascend' / 'cann').mkdir(parents=True)
    (home / 'Ascend' / 'cann' / 'set_env.sh').write_text('export FAKE_CANN_LOADED=home\n')
    show = 'echo "${FAKE_CANN_LOADED-} ${CPU_AFFINITY_CONF-} ${TASK_QUEUE_ENABLE-} ${TORCH_DEVICE_BACKEND_AUTOLOAD-unset}"'
    assert _sourced(env_npu, show, HOME=str(home)) == 'home 1 2 unset'          # a user's own install
    assert _sourced(env_npu, show, CANN_ENV=str(fake_cann)) == '1 1 2 unset'
    assert _sourced(env_npu, show, CANN_ENV='/nonexistent') == '   0'
    assert _sourced(env_npu, show, CANN_ENV='/nonexistent', ASCEND_HOME_PATH='/opt/cann') == ' 1 2 unset'
    assert _sourced(env_npu, show, HOME=str(home), ASCEND_TOOLKIT_HOME='/opt/cann') == ' 1 2 unset'


@pytest.mark.parametrize('cann, visible', [({'ASCEND_HOME_PATH': '/opt/cann'}, '3 AUTOLOAD unset'),
                                           ({}, '3 AUTOLOAD 0')])
def test_a_one_card_run_takes_ascend_device_id_however_cann_was_set_up(repo, dataset, fake_cann, cann, visible):
    """CANN already in the environment (no set_env.sh sourced), or set up where the script does
    not look: ASCEND_DEVICE_ID is still the card of a 1-device run."""
    bin_dir = fake_cann.parent / 'bin'
    done = script(repo, 'test/train_full_1p.sh', f'--data_path={dataset}', ASCEND_DEVICE_ID='3',
                  PATH=f'{bin_dir}:{os.environ["PATH"]}', **cann)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f'VISIBLE {visible}' in done.stdout


def test_performance_run_without_validation_or_vocabulary(repo, dataset, tmp_path, fake_cann):
    """A performance run needs only the training pair; the vocabulary then comes from data/."""
    train_only = tmp_path / 'train_only'
    train_only.mkdir()
    for name in ('yfcc15m_clean_open_data.json', 'yfcc15m_clean_open_data'):
        (train_only / name).symlink_to(dataset / name)
    done = script(repo, 'test/train_performance_1p.sh', f'--data_path={train_only}', CANN_ENV=str(fake_cann))
    assert done.returncode == 0, done.stdout + done.stderr
    args = re.search(r'^ARGS (.*)$', done.stdout, re.M).group(1).split()
    assert [a.split('=')[0] for a in args if a.startswith('--config.data.')] == [
        '--config.data.train_meta', '--config.data.train_root']
    done = script(repo, 'test/train_full_1p.sh', f'--data_path={train_only}', CANN_ENV=str(fake_cann))
    assert done.returncode != 0 and f'dataset folder {train_only} has no val_official.json' in done.stderr
