"""compare-demo: DeCLIP against its CLIP twin on the demo corpus, at equal steps and at equal
training time, over seeds, with two controls that swap the views (CLIP with DeCLIP's, DeCLIP with
CLIP's), so that the table separates what the views do from what the rest of the recipe does; it goes
to runs/compare/compare.md.

    python tools/compare_demo.py                       # seeds 0, 1, 2; configs/demo.py's steps
    python tools/compare_demo.py --seeds=0 --steps=200 --set=data.workers=2
"""
import json
import statistics
import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the library beside tools/, run as a script

import data  # noqa: E402

FLAGS = flags.FLAGS

BUSY_SLOWDOWN = 1.5   # a log window slower than this many times the run's median: the machine was busy
COMPARE_LABELS = {'declip': 'DeCLIP (`configs/demo.py`)', 'clip': 'CLIP (`configs/demo.py:clip`)',
                  'declip_short': "DeCLIP, as many steps as fit in CLIP's time",
                  'clip_declip_views': "CLIP with DeCLIP's views (MoCo v2: crop 0.2-1, flip, colour ops, blur)",
                  'declip_clip_views': "DeCLIP with CLIP's views (STANDARD_SLIP: crop 0.5-1 only)"}
DECLIP_VIEWS = ('data.augmentation=moco_v2', 'data.crop_scale=(0.2,1.0)')        # as configs/common.py sets them
CLIP_VIEWS = ('data.augmentation=standard_slip', 'data.crop_scale=(0.5,1.0)')
# run -> (config, its own overrides: after those of every run, so that the label stays true)
COMPARE_RUNS = {'declip': ('configs/demo.py', ()), 'clip': ('configs/demo.py:clip', ()),
                'declip_short': ('configs/demo.py', ()), 'clip_declip_views': ('configs/demo.py:clip', DECLIP_VIEWS),
                'declip_clip_views': ('configs/demo.py', CLIP_VIEWS)}
# (key, run, run it is paired with by seed): the top-1 differences the table shows
COMPARE_DELTAS = (('delta_equal_steps', 'declip', 'clip'), ('delta_equal_time', 'declip_short', 'clip'),
                  ('delta_declip_views', 'declip', 'clip_declip_views'),
                  ('delta_clip_views', 'declip_clip_views', 'clip'))


def training_seconds(workdir):
    """(seconds, steps, slowdown) of a run's training: each log window's perf/step_ms times its
    steps, summed (start-up and evaluation are not in it; a resumed run's re-logged windows count
    once); slowdown = the slowest window's step time over the median window's, after the first
    (1.0-1.2 on a quiet machine; far above: something else used the CPUs)."""
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    logging.getLogger('tensorboard').setLevel(logging.WARNING)     # not a line per event file read
    acc = EventAccumulator(str(Path(workdir) / 'tb'), size_guidance={'scalars': 0})
    acc.Reload()
    step_ms = {e.step: e.value for e in acc.Scalars('perf/step_ms')}
    seconds, last = 0.0, 0
    for step in sorted(step_ms):
        seconds += step_ms[step] * (step - last) / 1000
        last = step
    later = [step_ms[k] for k in sorted(step_ms)[1:]] or list(step_ms.values())
    return seconds, last, max(later) / statistics.median(later)


def _logged(cmd, log):
    """Run a repository script, its output appended to `log`; a failure names the log and its tail."""
    import subprocess
    import sys
    with open(log, 'a') as f:
        f.write(f'$ {" ".join(cmd)}\n')
        f.flush()
        rc = subprocess.run([sys.executable, *cmd], cwd=data.ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = '\n'.join(Path(log).read_text().splitlines()[-15:])
        raise SystemExit(f'compare-demo: `python {" ".join(cmd)}` failed (exit {rc}); log {log}:\n{tail}')


def compare_run(out, seed, name, overrides=(), *, steps=0, prompts='prompt6', val_root, val_meta):
    """Train and evaluate one run of the comparison in out/seed<S>/<name> (a finished one with the
    same command is read back, an interrupted one resumes). Training leaves evaluation to
    evaluate.py, so the step times hold training only."""
    import time
    work, (config, own) = Path(out) / f'seed{seed}' / name, COMPARE_RUNS[name]
    train_cmd = ['train.py', '--config', config, '--workdir', str(work), f'--config.seed={seed}',
                 *(f'--config.{o}' for o in (*overrides, *own)), '--config.data.val_meta=']
    train_cmd += [f'--config.max_iter={steps}'] if steps else []
    record_path = work / 'result.json'
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record['command'] == train_cmd:
            return record
        raise SystemExit(f'compare-demo: {record_path} holds the result of another command '
                         f'({" ".join(record["command"])}); choose another --out')
    work.mkdir(parents=True, exist_ok=True)
    print(f'seed {seed} {name}: python {" ".join(train_cmd)}  (log: {work / "run.log"})', flush=True)
    start = time.perf_counter()
    _logged(train_cmd, work / 'run.log')
    wall = time.perf_counter() - start
    _logged(['evaluate.py', '--ckpt', str(work / 'checkpoints' / 'last.pt'), '--prompts', prompts, '--val_root',
             str(val_root), '--val_meta', str(val_meta), '--out', str(work / 'zeroshot.json')], work / 'run.log')
    metrics = json.loads((work / 'zeroshot.json').read_text())
    seconds, done, slowdown = training_seconds(work)
    record = dict(run=name, seed=seed, steps=done, train_s=seconds, wall_s=wall, slowdown=slowdown,
                  top1=metrics['zeroshot_top1'], top5=metrics['zeroshot_top5'], command=train_cmd)
    record_path.write_text(json.dumps(record, indent=2))
    return record


def compare_demo(out, *, seeds, run=compare_run, **run_args):
    """Per seed: DeCLIP (the demo's run), CLIP with as many steps, DeCLIP with the steps that fit in
    that CLIP run's training time (each run on its own full schedule, so neither is compared half-way
    through its LR decay), then the controls with DeCLIP's steps: CLIP with DeCLIP's views and DeCLIP
    with CLIP's. Writes out/compare.json and out/compare.md; returns the table."""
    records = []
    for seed in seeds:
        declip = run(out, seed, 'declip', **run_args)
        equal = {**run_args, 'steps': declip['steps']}
        clip = run(out, seed, 'clip', **equal)
        short = max(1, round(declip['steps'] * clip['train_s'] / declip['train_s']))
        records += [declip, clip, run(out, seed, 'declip_short', **{**run_args, 'steps': short}),
                    run(out, seed, 'clip_declip_views', **equal), run(out, seed, 'declip_clip_views', **equal)]
        for r in records[-5:]:
            print(f'seed {seed} {r["run"]}: {r["steps"]} steps, {r["train_s"]:.0f} s training (slowest log window '
                  f'{r.get("slowdown", 1):.2f}x the median), top-1 {r["top1"]:.2f}', flush=True)
    summary = compare_summary(records)
    table = compare_table(summary)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / 'compare.json').write_text(json.dumps({'summary': summary, 'runs': records}, indent=2))
    (Path(out) / 'compare.md').write_text(table + '\n')
    print(table)
    return table


def _stats(values):
    return {'mean': statistics.fmean(values), 'std': statistics.stdev(values) if len(values) > 1 else 0.0,
            'n': len(values)}


def compare_summary(records):
    """Mean and sample standard deviation over seeds of each run's steps, training seconds, top-1 and
    top-5, and of the per-seed top-1 differences DeCLIP - CLIP of COMPARE_DELTAS (at equal steps:
    declip - clip; at equal training time: declip_short - clip; both with DeCLIP's views; both with
    CLIP's views)."""
    by_run = {}
    for r in records:
        by_run.setdefault(r['run'], {})[r['seed']] = r
    summary = {name: {k: _stats([r[k] for r in runs.values()]) for k in ('steps', 'train_s', 'top1', 'top5')}
               for name, runs in by_run.items()}
    for key, name, other in COMPARE_DELTAS:
        seeds = sorted(set(by_run.get(name, {})) & set(by_run.get(other, {})))
        if seeds:
            summary[key] = _stats([by_run[name][s]['top1'] - by_run[other][s]['top1'] for s in seeds])
    summary['seeds'] = sorted({r['seed'] for r in records})
    summary['busy'] = [f'seed {r["seed"]} {r["run"]}' for r in records if r.get('slowdown', 1) > BUSY_SLOWDOWN]
    return summary


def compare_table(summary):
    """The summary as a markdown table (mean ± std over seeds)."""
    def cell(s, digits=2, sign=''):
        text = f'{s["mean"]:{sign}.{digits}f}'
        return text + (f' ± {s["std"]:.{digits}f}' if s['n'] > 1 else '')
    lines = [f'seeds {", ".join(map(str, summary["seeds"]))}: mean ± sample std over seeds; training time = '
             'the sum of the step times (perf/step_ms), without start-up and evaluation', '',
             *([f'**warning**: a log window of {", ".join(summary["busy"])} took over {BUSY_SLOWDOWN}x the run\'s '
                'median step time: the machine was busy, so the training times (and the equal-time steps) are '
                'not comparable; run again on a quiet machine', ''] if summary.get('busy') else []),
             '| comparison | run | steps | training time (s) | zero-shot top-1 (%) | top-5 (%) |',
             '|---|---|---|---|---|---|']
    for title, (delta, *runs) in (('equal steps', COMPARE_DELTAS[0]), ('equal training time', COMPARE_DELTAS[1]),
                                  ("control: both with DeCLIP's views", COMPARE_DELTAS[2]),
                                  ("control: both with CLIP's views", COMPARE_DELTAS[3])):
        for run in runs:
            if run in summary:
                s = summary[run]
                lines.append(f'| {title} | {COMPARE_LABELS[run]} | {cell(s["steps"], 0)} | {cell(s["train_s"], 0)} '
                             f'| {cell(s["top1"])} | {cell(s["top5"])} |')
        if delta in summary:
            lines.append(f'| {title} | DeCLIP - CLIP, paired by seed | | | {cell(summary[delta], sign="+")} | |')
    return '\n'.join(lines)


def main(argv):
    if len(argv) != 1:
        raise app.UsageError(f'no arguments besides the flags (got {argv[1:]})')
    demo = data.DATA_DIR / 'demo'
    compare_demo(FLAGS.out or data.ROOT / 'runs' / 'compare', seeds=[int(s) for s in FLAGS.seeds], steps=FLAGS.steps,
                 overrides=FLAGS.set, prompts=FLAGS.prompts, val_root=FLAGS.val_root or demo / 'val',
                 val_meta=FLAGS.val_meta or demo / 'val.jsonl')


if __name__ == '__main__':
    flags.DEFINE_string('out', None, 'output folder (default: runs/compare)')
    flags.DEFINE_list('seeds', ['0', '1', '2'], 'training seeds')
    flags.DEFINE_integer('steps', 0, 'DeCLIP and CLIP steps (0: configs/demo.py max_iter)')
    flags.DEFINE_multi_string('set', [], 'a config override KEY=VALUE for every run (repeatable)')
    flags.DEFINE_string('prompts', 'prompt6', 'zero-shot prompt set')
    flags.DEFINE_string('val_root', '', 'validation images (default: data/demo/val)')
    flags.DEFINE_string('val_meta', '', 'validation meta (default: data/demo/val.jsonl)')
    app.run(main)
