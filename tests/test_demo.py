"""The demo corpus is a zero-shot task whose label (the shape) survives DeCLIP's views and whose
colour is a nuisance, and compare-demo's orchestration and table are right (on fake runs, and one
real 2-step run)."""
import collections
import json
import math
import random
import re

import numpy as np
import pytest

from helpers import smoke_overrides
from tools import compare_demo, demo

SHAPES, COLOURS = list(demo.DEMO_SHAPES), list(demo.DEMO_COLORS)


def pattern(words):
    return re.compile(r'\b(' + '|'.join(words) + r')\b')


def test_the_zero_shot_classes_are_the_shapes_and_name_no_nuisance():
    names = demo.demo_class_names()
    assert names == SHAPES and len(set(names)) == len(names) >= 8
    nuisances = pattern([*COLOURS, *(w for _, others in demo.DEMO_COLORS.values() for w in others),
                         *demo.DEMO_BACKGROUNDS, *(w for pair in demo.DEMO_GRIDS.values() for w in pair)])
    assert not [n for n in names if nuisances.search(n)]


def test_written_validation_set_is_balanced_over_the_classes(demo_dir):
    names = demo.demo_class_names()
    assert (demo_dir / 'classnames.txt').read_text().split('\n')[:-1] == names
    records = [json.loads(line) for line in (demo_dir / 'val.jsonl').read_text().splitlines()]
    assert len(records) == 60 and all(names[r['label']] == r['label_name'] for r in records)
    assert set(collections.Counter(r['label'] for r in records).values()) == {60 // len(names)}
    train = [json.loads(line) for line in (demo_dir / 'train.jsonl').read_text().splitlines()]
    assert len(train) == 240 and set(train[0]) == {'filename', 'caption'}
    assert len(list((demo_dir / 'shards').glob('*.tar'))) == 1


def test_captions_name_the_shape_shown_and_no_other_and_colour_is_a_nuisance():
    shape_words = {s: pattern([s, *others]) for s, others in demo.DEMO_SHAPES.items()}
    colour_words = {c: pattern([c, *others]) for c, (_, others) in demo.DEMO_COLORS.items()}
    specs = [demo.demo_spec(0, 'train', i) for i in range(600)]
    assert set(collections.Counter(s['shape'] for s in specs).values()) == {600 // len(SHAPES)}
    for s in specs:
        assert [k for k, w in shape_words.items() if w.search(s['caption'])] == [s['shape']], s['caption']
        assert [c for c, w in colour_words.items() if w.search(s['caption'])] in ([], [s['color']]), s['caption']
    # colour drawn independently of the class: every colour with every shape
    assert len({(s['shape'], s['color']) for s in specs}) == len(SHAPES) * len(COLOURS)
    # varied phrasings: many templates, the other words used, some captions without a colour,
    # class names never the whole caption
    assert len({re.sub(r'\w+', 'w', s['caption']) for s in specs}) >= 8
    assert sum(not re.search(rf'\b{s["shape"]}\b', s['caption']) for s in specs) > 100
    assert sum(not any(w.search(s['caption']) for w in colour_words.values()) for s in specs) > 60
    assert not {s['caption'] for s in specs} & set(demo.demo_class_names())


def test_validation_is_the_same_generator_under_other_seeds():
    assert demo.demo_spec(0, 'val', 5) == demo.demo_spec(0, 'val', 5)
    train, val = demo.demo_spec(0, 'train', 5), demo.demo_spec(0, 'val', 5)
    assert train['label'] == val['label'] and train['noise'] != val['noise']


@pytest.mark.parametrize('shape', SHAPES)
def test_a_flip_leaves_the_shape_a_flip_of_another_would_not_make(shape):
    """One upright copy is its own mirror image (a horizontal flip keeps the class) and differs
    from every other shape."""
    def upright(s):
        return demo.demo_mask(dict(shape=s, grid=1, copies=[(0, 0, 0.38, 0)]), 80) > 0.5
    mask = upright(shape)
    assert (mask & mask[:, ::-1]).sum() / (mask | mask[:, ::-1]).sum() > 0.95
    for other in SHAPES:
        if other != shape:
            assert (mask & upright(other)).sum() / (mask | upright(other)).sum() < 0.85, other


@pytest.mark.parametrize('grid', sorted(demo.DEMO_GRIDS))
def test_a_smallest_crop_still_holds_a_copy(grid):
    """The copies contrast with the background in grey, and a 0.2-area crop of any aspect ratio the
    views draw (3/4 to 4/3) holds most of a copy (3 x 3) or parts of several (2 x 2)."""
    specs = [s for s in (demo.demo_spec(0, 'train', i) for i in range(60)) if s['grid'] == grid][:12]
    rng = random.Random(grid)
    for spec in specs:
        img = np.asarray(demo.demo_image(spec, 80)).astype(float)
        grey = img @ [0.299, 0.587, 0.114]
        alone = [[c if j == k else (0, 0, 0, 0) for j, c in enumerate(spec['copies'])] for k in range(grid * grid)]
        copies = [demo.demo_mask({**spec, 'copies': c}, 80) > 0.5 for c in alone]   # copy k alone (the others: a dot)
        assert abs(grey[demo.demo_mask(spec, 80) > 0.99].mean() - grey[demo.demo_mask(spec, 80) < 0.01].mean()) > 50
        for _ in range(40):
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(80 * math.sqrt(0.2 * ratio)), round(80 * math.sqrt(0.2 / ratio))
            x, y = rng.randrange(81 - w), rng.randrange(81 - h)
            seen = max(m[y:y + h, x:x + w].sum() / m.sum() for m in copies)
            assert seen > {2: 0.12, 3: 0.6}[grid], (spec, x, y, w, h)


# ----------------------------------------------------------------------------------------------
# compare-demo
# ----------------------------------------------------------------------------------------------

def fake_records():
    rows = []
    for seed, (d, c, s, cd, dc) in enumerate([(60.0, 50.0, 55.0, 40.0, 65.0), (64.0, 52.0, 53.0, 44.0, 66.0),
                                              (62.0, 57.0, 58.0, 45.0, 70.0)]):
        rows += [dict(run='declip', seed=seed, steps=600, train_s=200.0 + seed, top1=d, top5=100.0),
                 dict(run='clip', seed=seed, steps=600, train_s=100.0 - seed, top1=c, top5=99.0),
                 dict(run='declip_short', seed=seed, steps=300 - seed, train_s=101.0, top1=s, top5=98.0),
                 dict(run='clip_declip_views', seed=seed, steps=600, train_s=120.0, top1=cd, top5=97.0),
                 dict(run='declip_clip_views', seed=seed, steps=600, train_s=190.0, top1=dc, top5=100.0)]
    return rows


def test_compare_summary_means_sample_stds_and_paired_differences():
    summary = compare_demo.compare_summary(fake_records())
    assert summary['seeds'] == [0, 1, 2]
    assert summary['declip']['top1'] == {'mean': 62.0, 'std': pytest.approx(2.0), 'n': 3}
    assert summary['clip']['top1']['mean'] == pytest.approx(53.0)
    assert summary['clip']['top1']['std'] == pytest.approx(np.std([50, 52, 57], ddof=1))
    assert summary['delta_equal_steps']['mean'] == pytest.approx(9.0)                 # 10, 12, 5
    assert summary['delta_equal_steps']['std'] == pytest.approx(np.std([10, 12, 5], ddof=1))
    assert summary['delta_equal_time']['mean'] == pytest.approx(7 / 3)                # 5, 1, 1
    assert summary['declip_short']['steps']['mean'] == pytest.approx(299)
    assert summary['delta_declip_views']['mean'] == pytest.approx(19.0)               # 20, 20, 17
    assert summary['delta_clip_views']['mean'] == pytest.approx(14.0)                 # 15, 14, 13
    assert summary['delta_clip_views']['std'] == pytest.approx(1.0)


def test_compare_table_rows():
    table = compare_demo.compare_table(compare_demo.compare_summary(fake_records()))
    lines = table.splitlines()
    assert lines[0].startswith('seeds 0, 1, 2: mean ± sample std')
    assert ('| equal steps | DeCLIP (`configs/demo.py`) | 600 ± 0 | 201 ± 1 | 62.00 ± 2.00 | 100.00 ± 0.00 |'
            in lines)
    assert '| equal steps | CLIP (`configs/demo.py:clip`) | 600 ± 0 | 99 ± 1 | 53.00 ± 3.61 | 99.00 ± 0.00 |' \
        in lines
    assert '| equal steps | DeCLIP - CLIP, paired by seed | | | +9.00 ± 3.61 | |' in lines
    assert ("| equal training time | DeCLIP, as many steps as fit in CLIP's time | 299 ± 1 | 101 ± 0 "
            "| 55.33 ± 2.52 | 98.00 ± 0.00 |") in lines
    assert '| equal training time | DeCLIP - CLIP, paired by seed | | | +2.33 ± 2.31 | |' in lines
    controls = [line for line in lines if line.startswith('| control')]
    assert controls == [
        "| control: both with DeCLIP's views | DeCLIP (`configs/demo.py`) | 600 ± 0 | 201 ± 1 | 62.00 ± 2.00 "
        "| 100.00 ± 0.00 |",
        "| control: both with DeCLIP's views | CLIP with DeCLIP's views (MoCo v2: crop 0.2-1, flip, colour ops, blur) "
        "| 600 ± 0 | 120 ± 0 | 43.00 ± 2.65 | 97.00 ± 0.00 |",
        "| control: both with DeCLIP's views | DeCLIP - CLIP, paired by seed | | | +19.00 ± 1.73 | |",
        "| control: both with CLIP's views | DeCLIP with CLIP's views (STANDARD_SLIP: crop 0.5-1 only) | 600 ± 0 "
        "| 190 ± 0 | 67.00 ± 2.65 | 100.00 ± 0.00 |",
        "| control: both with CLIP's views | CLIP (`configs/demo.py:clip`) | 600 ± 0 | 99 ± 1 | 53.00 ± 3.61 "
        "| 99.00 ± 0.00 |",
        "| control: both with CLIP's views | DeCLIP - CLIP, paired by seed | | | +14.00 ± 1.00 | |"]
    one_seed = compare_demo.compare_table(compare_demo.compare_summary([r for r in fake_records() if r['seed'] == 0]))
    assert '| equal steps | DeCLIP - CLIP, paired by seed | | | +10.00 | |' in one_seed.splitlines()
    assert 'warning' not in table


def test_compare_table_warns_when_a_run_had_a_busy_machine():
    records = fake_records()
    records[6]['slowdown'], records[0]['slowdown'] = 2.6, 1.2       # seed 1 clip slowed down; seed 0 declip fine
    summary = compare_demo.compare_summary(records)
    assert summary['busy'] == ['seed 1 clip']
    assert compare_demo.compare_table(summary).splitlines()[2].startswith('**warning**: a log window of seed 1 clip took')


def test_compare_demo_gives_declip_the_steps_that_fit_in_clips_time_and_the_controls_equal_steps(tmp_path):
    calls = []

    def fake_run(out, seed, name, *, steps=0, **kw):
        calls.append((seed, name, steps))
        per_step = {'clip': 0.2 + 0.01 * seed}.get(name, 0.5)        # DeCLIP 2.5x slower per step
        done = steps or 400
        return dict(run=name, seed=seed, steps=done, train_s=done * per_step, top1=50.0 + seed, top5=90.0)
    table = compare_demo.compare_demo(tmp_path / 'c', seeds=[0, 1], run=fake_run)
    assert calls == [(0, 'declip', 0), (0, 'clip', 400), (0, 'declip_short', 160), (0, 'clip_declip_views', 400),
                     (0, 'declip_clip_views', 400),
                     (1, 'declip', 0), (1, 'clip', 400), (1, 'declip_short', 168), (1, 'clip_declip_views', 400),
                     (1, 'declip_clip_views', 400)]
    saved = json.loads((tmp_path / 'c' / 'compare.json').read_text())
    assert len(saved['runs']) == 10 and saved['summary']['declip_short']['steps']['mean'] == 164
    assert "| control: both with CLIP's views | DeCLIP - CLIP, paired by seed |" in table
    assert (tmp_path / 'c' / 'compare.md').read_text() == table + '\n'


def test_the_controls_swap_the_views_and_nothing_else():
    """CLIP with DeCLIP's views is configs/demo.py:clip with DeCLIP's augmentation and crop scale, and
    the other way round (the overrides are spelled as the config spells them)."""
    from absl import flags
    from ml_collections import config_flags

    def config(name):
        path, own = compare_demo.COMPARE_RUNS[name]
        argv = ['x', f'--config={compare_demo.data.ROOT / path}', *(f'--config.{o}' for o in own)]
        values = flags.FlagValues()
        config_flags.DEFINE_config_file('config', None, flag_values=values, sys_argv=argv)
        values(argv)
        return values.config.to_dict()
    for control, method, views in (('clip_declip_views', 'clip', 'declip'), ('declip_clip_views', 'declip', 'clip')):
        expected = config(method)
        expected['data'].update({k: config(views)['data'][k] for k in ('augmentation', 'crop_scale')})
        assert config(control) == expected, control
        assert config(control) != config(method)


def test_compare_run_trains_evaluates_and_reads_back(tmp_path, demo_dir):
    """One real 2-step run: trained without evaluation, evaluated by evaluate.py, timed from
    TensorBoard; a second call reads the result back; another command on the same folder is refused."""
    overrides = [o.removeprefix('--config.') for o in smoke_overrides(
        demo_dir, **{'data.batch_size': 8, 'data.workers': 0, 'optim.warmup_steps': 1})]
    args = dict(steps=2, prompts='prompt1', val_root=demo_dir / 'val', val_meta=demo_dir / 'val.jsonl')
    record = compare_demo.compare_run(tmp_path, 3, 'clip', overrides, **args)
    work = tmp_path / 'seed3' / 'clip'
    assert record['steps'] == 2 and record['seed'] == 3 and 0 < record['train_s'] < record['wall_s']
    assert record['slowdown'] >= 1
    evaluated = json.loads((work / 'zeroshot.json').read_text())
    assert (record['top1'], record['top5']) == (evaluated['zeroshot_top1'], evaluated['zeroshot_top5'])
    assert evaluated['images'] == 60 and evaluated['prompts'] == 'prompt1'
    assert '--config.seed=3' in record['command'] and 'configs/demo.py:clip' in record['command']
    assert 'zero-shot top-1' not in (work / 'run.log').read_text().split('evaluate.py')[0]  # not during training
    assert compare_demo.compare_run(tmp_path, 3, 'clip', overrides, **args) == record
    with pytest.raises(SystemExit, match='another command'):
        compare_demo.compare_run(tmp_path, 3, 'clip', overrides, **{**args, 'steps': 3})
