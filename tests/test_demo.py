"""The demo corpus is a zero-shot task that needs colour and shape, and compare-demo's orchestration
and table are right (on fake runs, and one real 2-step run)."""
import collections
import json
import re

import numpy as np
import pytest

from helpers import smoke_overrides
from tools import compare_demo, demo

COLOURS, SHAPES = list(demo.DEMO_COLORS), list(demo.DEMO_SHAPES)


def pattern(words):
    return re.compile(r'\b(' + '|'.join(words) + r')\b')


def test_every_zero_shot_class_needs_both_colour_and_shape():
    names = demo.demo_class_names()
    assert len(names) == len(set(names)) == len(COLOURS) * len(SHAPES) >= 16
    pairs = [tuple(n.split(' ')) for n in names]
    for colour in COLOURS:
        assert len({s for c, s in pairs if c == colour}) >= 2, colour   # colour alone does not decide
    for shape in SHAPES:
        assert len({c for c, s in pairs if s == shape}) >= 2, shape     # nor does shape alone


def test_written_validation_set_is_balanced_over_the_classes(demo_dir):
    names = demo.demo_class_names()
    assert (demo_dir / 'classnames.txt').read_text().split('\n')[:-1] == names
    records = [json.loads(line) for line in (demo_dir / 'val.jsonl').read_text().splitlines()]
    assert len(records) == 60 and all(names[r['label']] == r['label_name'] for r in records)
    assert set(collections.Counter(r['label'] for r in records).values()) == {60 // len(names)}
    train = [json.loads(line) for line in (demo_dir / 'train.jsonl').read_text().splitlines()]
    assert len(train) == 240 and set(train[0]) == {'filename', 'caption'}
    assert len(list((demo_dir / 'shards').glob('*.tar'))) == 1


def test_captions_name_the_colour_and_shape_shown_and_no_other():
    colour_words = {c: pattern([c, *others]) for c, (_, others) in demo.DEMO_COLORS.items()}
    shape_words = {s: pattern([s, *others]) for s, others in demo.DEMO_SHAPES.items()}
    specs = [demo.demo_spec(0, 'train', i) for i in range(400)]
    assert set(collections.Counter(s['color'] for s in specs).values()) == {400 // len(COLOURS)}
    assert set(collections.Counter(s['shape'] for s in specs).values()) == {400 // len(SHAPES)}
    for s in specs:
        assert [c for c, w in colour_words.items() if w.search(s['caption'])] == [s['color']], s['caption']
        assert [k for k, w in shape_words.items() if w.search(s['caption'])] == [s['shape']], s['caption']
    # varied phrasings: many templates, the other words used, class names never the whole caption
    assert len({re.sub(r'\w+', 'w', s['caption']) for s in specs}) >= 8
    assert sum(not re.search(rf'\b{s["color"]}\b', s['caption']) for s in specs) > 40
    assert not {s['caption'] for s in specs} & set(demo.demo_class_names())


def test_validation_is_the_same_generator_under_other_seeds():
    assert demo.demo_spec(0, 'val', 5) == demo.demo_spec(0, 'val', 5)
    train, val = demo.demo_spec(0, 'train', 5), demo.demo_spec(0, 'val', 5)
    assert train['label'] == val['label'] and train['noise'] != val['noise']


@pytest.mark.parametrize('shape', SHAPES)
def test_the_object_is_large_and_its_shape_is_drawn(shape):
    """The object spans at least 0.45 of the side (a 0.2-area crop, 0.45 of the side, still holds
    part of it) and its pixels fill the fraction of its box that the shape implies."""
    side = 80
    label = COLOURS.index('red') * len(SHAPES) + SHAPES.index(shape)
    fills = []
    for i in range(label, label + 20 * len(COLOURS) * len(SHAPES), len(COLOURS) * len(SHAPES)):
        spec = demo.demo_spec(0, 'train', i)
        img = np.asarray(demo.demo_image(spec, side)).astype(int)
        red = (img[..., 0] > 170) & (img[..., 1] < 90) & (img[..., 2] < 90)
        rows, cols = np.nonzero(red)
        extent = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
        assert extent >= 0.45 * side, (shape, spec)
        fills.append(red.sum() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)))
        centre = red[int(side * (0.5 + spec['dy'])), int(side * (0.5 + spec['dx']))]
        assert centre == (shape != 'ring'), spec                  # a ring shows the background inside
    expected = {'circle': 0.78, 'square': 0.72, 'triangle': 0.48, 'cross': 0.53, 'ring': 0.51}[shape]
    assert np.mean(fills) == pytest.approx(expected, abs=0.04)


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
