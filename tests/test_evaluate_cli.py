"""evaluate.py on the command line: a smoke run's numbers, 2 processes scoring each image once, clear errors."""
import json
import sys

import pytest
import torch

import data
import text
import weights
from helpers import beside, free_port, run, smoke_overrides


def test_evaluate_cli_on_a_smoke_checkpoint(tmp_path, demo_dir):
    vocabulary = tmp_path / 'vocab' / data.BPE_PATH.name   # the run's own copy of the vocabulary
    vocabulary.parent.mkdir()
    vocabulary.write_bytes(data.BPE_PATH.read_bytes())
    res = run(['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(tmp_path),
               *smoke_overrides(demo_dir, max_iter=2, **{'data.bpe_path': vocabulary})])
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = tmp_path / 'checkpoints' / 'last.pt'
    assert weights.load_model(ckpt)[0].bpe_path == vocabulary   # evaluation tokenizes with it
    res = run(['evaluate.py', '--ckpt', str(tmp_path), '--workers', '0'])   # a workdir, the run's eval.prompts
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / 'checkpoints' / 'last.zeroshot.json').read_text())
    assert metrics['images'] == 60 and metrics['kind'] == 'ours' and metrics['checkpoint'] == str(ckpt)
    assert metrics['prompts'] == 'prompt1'
    # the same number computed directly: prompt ensemble over the classes present, argmax
    model, preprocess = weights.load_model(ckpt)
    records = [json.loads(line) for line in (demo_dir / 'val.jsonl').read_text().splitlines()]
    classes = sorted({(r['label'], r['label_name']) for r in records})
    tok = data.get_tokenizer()
    templates = text.load_prompts('prompt1')
    assert templates == ['a photo of a {0}.']
    assert len(text.load_prompts('prompt8')) == 8 and text.load_prompts('prompt8')[0] == 'a photo of a {0}'
    from PIL import Image
    with torch.no_grad():
        cls = []
        for _, name in classes:
            emb = model.encode_text(tok([t.replace('{0}', name) for t in templates], 24))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(0)
            cls.append(mean / mean.norm())
        cls = torch.stack(cls)
        correct = 0
        for r in records:
            f = model.encode_image(preprocess(Image.open(demo_dir / 'val' / r['filename']))[None])[0]
            correct += int(classes[int((cls @ (f / f.norm())).argmax())][0] == r['label'])
    assert metrics['zeroshot_top1'] == pytest.approx(100 * correct / len(records), abs=1e-6)
    retrieval = [sys.executable, 'evaluate.py', '--ckpt', str(ckpt), '--task', 'retrieval', '--workers', '0']
    with beside(retrieval, tmp_path / 'retrieval.log') as proc:
        (tmp_path / 'empty').mkdir()                # a wrong image folder: an error before any image is scored
        wrong = run(['evaluate.py', '--ckpt', str(ckpt), '--val_root', str(tmp_path / 'empty'),
                     '--out', str(tmp_path / 'x')])
        res = run(['evaluate.py', '--ckpt', str(ckpt), '--out', str(tmp_path / 'missing' / 'r.json')])  # refused first
    assert proc.returncode == 0, (tmp_path / 'retrieval.log').read_text()[-3000:]
    r = json.loads((tmp_path / 'checkpoints' / 'last.retrieval.json').read_text())
    assert r['pairs'] == 60 and 0 <= r['i2t_R@1'] <= r['i2t_R@5'] <= r['i2t_R@10'] <= 100
    assert wrong.returncode != 0 and not (tmp_path / 'x').exists()
    assert f"none of the first 60 images of {demo_dir / 'val.jsonl'} is a file under '{tmp_path / 'empty'}'" in wrong.stderr
    assert res.returncode != 0 and 'Traceback' not in res.stderr
    assert f"--out '{tmp_path / 'missing' / 'r.json'}': {tmp_path / 'missing' / 'r.json'} cannot be written" in res.stderr


def test_two_process_evaluation_counts_every_image_once(full_run, demo_dir, tmp_path):
    """evaluate.py under 2 processes scores each image once and equals the single-process result."""
    lines = [line for line in (demo_dir / 'val.jsonl').read_text().splitlines() if line.strip()][:-1]
    assert len(lines) % 2 == 1  # an uneven split between the two ranks
    (tmp_path / 'val.jsonl').write_text('\n'.join(lines) + '\n')
    args = ['evaluate.py', '--ckpt', str(full_run / 'checkpoints' / 'last.pt'), '--workers', '0',
            '--prompts', 'prompt1', '--val_root', str(demo_dir / 'val'), '--val_meta', str(tmp_path / 'val.jsonl')]
    res = run([*args, '--out', str(tmp_path / 'A.json')])
    assert res.returncode == 0, res.stderr[-3000:]
    res = run(['-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(free_port()),
               *args, '--out', str(tmp_path / 'B.json')])
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ('A.json', 'B.json'))
    assert one['images'] == two['images'] == len(lines)
    assert one['zeroshot_top1'] == two['zeroshot_top1'] and one['zeroshot_top5'] == two['zeroshot_top5']


def test_evaluate_cli_names_a_tensor_checkpoint(tmp_path):
    torch.save(torch.zeros(3), tmp_path / 'tensor.pt')
    res = run(['evaluate.py', '--ckpt', str(tmp_path / 'tensor.pt'), '--val_meta', 'x'], timeout=120)
    assert res.returncode != 0 and 'AttributeError' not in res.stderr
    assert f'{tmp_path / "tensor.pt"}: expected a dict' in res.stderr and 'got Tensor' in res.stderr
