"""Behaviours the rest of the suite does not check: MLM mask streams, EDA stopwords, normalisation
constants, NN queue after resume, logged LR, zero-shot rows, 2-process evaluation, eot pooling,
torn checkpoint writes. Expected values are computed here from formulas or brute force."""
import io
import json
import random

import pytest
import torch

import checkpoints
import data
import declip
import evaluate
import guard
import images
import text
import trainstep
from configs import demo
from helpers import free_port, run, scalars, smoke_overrides, torchrun

SMOKE = demo.get_config('smoke')
QUEUE = 40  # 2 x 8 keys pushed per step: the pointer wraps during steps 3 and 5 of 6


def tiny_model():
    torch.manual_seed(0)
    return declip.build_model(SMOKE.model).eval()


# ---------------------------------------------------------------- shared 2-process training run

def queue_overrides(demo_dir, **extra):
    return smoke_overrides(demo_dir, **{'loss.queue_size': QUEUE, **extra})


@pytest.fixture(scope='module')
def full_run(tmp_path_factory, demo_dir):
    """The smoke config for its 6 steps in one go, 2 processes, LR logged every step."""
    workdir = tmp_path_factory.mktemp('full')
    res = torchrun(workdir, queue_overrides(demo_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    return workdir


# ---------------------------------------------------------------- 1. MLM mask streams

CAPTION = ' '.join(f'a photo of the {c} {s} on a sandy background'
                   for c in ('red', 'green', 'blue') for s in ('circle', 'cross'))  # 60 BPE tokens


def masked_batch(positions):
    """(masked text, selected positions [B, L]) of Collate for identical captions at these stream positions."""
    tokens = data.tokenize([CAPTION], 77)[0]
    samples = [{'text': tokens.clone(), 'bad': torch.zeros(len(guard.BAD_KINDS), dtype=torch.long),
                'images': torch.zeros(2, 3, 1, 1, dtype=torch.uint8), 'position': p} for p in positions]
    out = data.Collate(mask=True, seed=0)(samples)
    selected = torch.zeros(out['text'].numel(), dtype=torch.bool)
    selected[out['mlm_index']] = True
    assert torch.equal(out['mlm_targets'], tokens.repeat(len(positions))[out['mlm_index']])
    return out['text'], selected.view_as(out['text'])


def stream_positions(rank, step, batch=4, world=2):
    sampler = data.IterationSampler(1000, batch_size=batch, world_size=world, rank=rank, max_iter=step + 1,
                                    seed=0, start_step=step)
    return [position for _, position in sampler]


def test_mlm_masks_differ_across_rows_batches_and_ranks_but_repeat_per_position():
    """MLM masks differ between batch rows, batches and ranks; the same stream position gives the same mask."""
    r0s0, r1s0, r0s1 = stream_positions(0, 0), stream_positions(1, 0), stream_positions(0, 1)
    assert r0s0[0] != r1s0[0] and r0s0[0] != r0s1[0]
    text, mask = masked_batch(r0s0)
    assert mask.any(dim=1).all()
    assert all(not torch.equal(mask[i], mask[j]) for i in range(len(mask)) for j in range(i))   # rows
    assert (masked_batch(r0s1)[1] != mask).any(dim=1).all()                                     # next batch
    assert (masked_batch(r1s0)[1] != mask).any(dim=1).all()                                     # other rank
    again = masked_batch(r0s0)                                                                  # same positions
    assert torch.equal(again[0], text) and torch.equal(again[1], mask)


# ---------------------------------------------------------------- 2. EDA stopwords

def test_synonym_replacement_never_replaces_a_stopword():
    """EDA synonym replacement keeps every stopword, even stopwords that have WordNet synonyms."""
    eda = text.EDA(data.SYNONYMS_PATH)
    words = 'the cat jumped over the wall and ran out up the hill once very fast'.split()
    stop = [i for i, w in enumerate(words) if w in eda.stopwords]
    assert {'over', 'out', 'up', 'once', 'very'} <= {words[i] for i in stop}
    assert all(eda.synonyms(w) for w in ('over', 'out', 'up', 'once', 'very'))   # they could be replaced
    changed = 0
    for seed in range(300):
        out = eda.synonym_replacement(words, random.Random(seed))
        assert len(out) == len(words)
        assert [out[i] for i in stop] == [words[i] for i in stop], seed
        changed += out != words
    assert changed == 300


# ---------------------------------------------------------------- 3. normalisation constants

def test_normalisation_uses_imagenet_mean_and_std():
    """Images are normalised with ImageNet's mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225)."""
    values = (200, 100, 30)
    pixels = torch.tensor(values, dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4).contiguous()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = torch.tensor([(v / 255 - m) / s for v, m, s in zip(values, mean, std)]).view(1, 3, 1, 1)
    expected = expected.expand(2, 3, 4, 4)
    torch.testing.assert_close(images.normalize_images(pixels), expected, rtol=0, atol=1e-6)
    out = images.device_augment(pixels, generator=torch.Generator().manual_seed(0), jitter_p=0, gray_p=0, blur_p=0)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- 4. NN queue after a resume

def fifo_pointer(steps, size, n):
    """The reference's push rule: EDA keys then masked-caption keys, n rows each, per step; a push
    reaching or passing the end fills to the end, drops the rest and restarts at 0."""
    ptr = 0
    for _ in range(2 * steps):
        ptr = 0 if ptr + n >= size else ptr + n
    return ptr


def test_queues_and_pointer_after_resume_equal_the_uninterrupted_run(full_run, demo_dir, tmp_path):
    """Stop at step 3 and resume to 6: every rank's NN queue and the pointer equal the one-go run's."""
    n = SMOKE.data.batch_size
    assert 2 * SMOKE.max_iter * n > 2 * QUEUE  # the pointer wraps around (twice) during the run
    res = torchrun(tmp_path, queue_overrides(demo_dir, stop_at=3))
    assert res.returncode == 0, res.stderr[-3000:]
    mid = checkpoints.safe_load(tmp_path / 'checkpoints' / 'last.pt')
    assert mid['step'] == 3 and mid['queue_ptr'] == fifo_pointer(3, QUEUE, n)
    res = torchrun(tmp_path, queue_overrides(demo_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'resumed from' in res.stderr
    resumed = checkpoints.safe_load(tmp_path / 'checkpoints' / 'last.pt')
    full = checkpoints.safe_load(full_run / 'checkpoints' / 'last.pt')
    assert full['step'] == resumed['step'] == SMOKE.max_iter
    assert full['queue_ptr'] == resumed['queue_ptr'] == fifo_pointer(SMOKE.max_iter, QUEUE, n)
    assert len(full['queues']) == len(resumed['queues']) == 2
    for a, b in zip(full['queues'], resumed['queues']):
        assert a.shape[0] == QUEUE and torch.equal(a, b)


# ---------------------------------------------------------------- 5. logged learning rate

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


# ---------------------------------------------------------------- 6. zero-shot classifier rows

def test_zero_shot_rows_are_normalised_means_of_normalised_prompt_embeddings():
    """Classifier row = normalise(mean(normalise(prompt embeddings))), unit norm."""
    model = tiny_model()
    names = ['red circle', 'blue square', 'green cross']
    templates = ['a photo of a {0}', 'a drawing of the {0}', '{0}', 'a big {0} on a grey background']
    got = evaluate.zero_shot_classifier(model, names, templates, tokenizer=data.get_tokenizer(),
                                        context_length=SMOKE.model.context_length, device='cpu')
    rows = []
    with torch.no_grad():
        for name in names:
            emb = model.encode_text(data.tokenize([t.replace('{0}', name) for t in templates],
                                                  SMOKE.model.context_length))
            mean = (emb / emb.norm(dim=-1, keepdim=True)).mean(dim=0)
            rows.append(mean / mean.norm())
    torch.testing.assert_close(got, torch.stack(rows), rtol=0, atol=1e-6)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(names)), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- 7. 2-process evaluation

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


# ---------------------------------------------------------------- 8. eot pooling

def test_text_embedding_is_read_at_the_eot_position():
    """The text embedding is text_projection(ln_final features) at the eot: tokens after it change nothing."""
    model = tiny_model()
    tokens = data.tokenize(['a red circle on a grey background', 'look at this cross!'], SMOKE.model.context_length)
    eot = (tokens == text.EOT_ID).int().argmax(dim=1)
    assert (eot < tokens.shape[1] - 2).all()
    before, after = tokens.clone(), tokens.clone()
    before[:, 2] = 320
    after[torch.arange(2), eot + 1] = 320
    with torch.no_grad():
        emb, feats = model.encode_text(tokens, return_tokens=True)
        manual = model.encode_text.text_projection(feats[torch.arange(2), eot])
        torch.testing.assert_close(emb, manual, rtol=0, atol=1e-6)
        assert ((model.encode_text(before) - emb).abs().amax(dim=1) > 1e-3).all()
        torch.testing.assert_close(model.encode_text(after), emb, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- 9. torn checkpoint write

def test_failed_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    """A save_checkpoint that dies half-way raises and leaves the previous last.pt intact."""
    path = tmp_path / 'last.pt'
    first = {'step': 3, 'weights': torch.arange(12.0).view(3, 4), 'queue_ptr': 8}
    checkpoints.save_checkpoint(path, first)
    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf)
        half = buf.getvalue()[:len(buf.getvalue()) // 2]
        if hasattr(f, 'write'):
            f.write(half)
        else:
            with open(f, 'wb') as out:
                out.write(half)
        raise OSError('No space left on device')

    monkeypatch.setattr(torch, 'save', torn_save)
    with pytest.raises(OSError, match='No space left'):
        checkpoints.save_checkpoint(path, {'step': 6, 'weights': torch.zeros(3, 4), 'queue_ptr': 16})
    monkeypatch.undo()
    loaded = checkpoints.safe_load(path)
    assert loaded.keys() == first.keys() and loaded['step'] == 3 and loaded['queue_ptr'] == 8
    assert torch.equal(loaded['weights'], first['weights'])
