"""Zero-shot classification and image-text retrieval, the evaluation dataset, the CLI (weights
are read and exported by weights.py).

    python evaluate.py --ckpt runs/demo/checkpoints/last.pt
    python evaluate.py --ckpt runs/demo                      # a workdir: its newest readable checkpoint
    python evaluate.py --ckpt declip_vitb32.pth.tar --val_root /data/imagenet/val --val_meta val_official.json
    torchrun --nproc_per_node 8 evaluate.py --ckpt runs/r50/checkpoints/last.pt --prompts prompt80
    python evaluate.py --ckpt runs/demo/checkpoints/last.pt --task retrieval
    python evaluate.py --ckpt runs/demo/checkpoints/last.pt --export exports/demo   # open_clip layout
"""
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from absl import app, flags

import data
import guard
import images
import runtime
import text
import weights

FLAGS = flags.FLAGS
ROOT = Path(__file__).resolve().parent
IMAGENET_CLASSNAMES = ROOT / 'assets' / 'imagenet_classnames.txt'


# ----------------------------------------------------------------------------------------------
# Prompt ensembles and metrics
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def zero_shot_classifier(model, class_names, templates, *, tokenizer, context_length, device, batch=1024):
    """[C, D] class embeddings: normalise(mean(normalise(embedding of each prompt))); all alike: an error."""
    rows = []
    for texts in text.class_prompts(class_names, templates):
        emb = torch.cat([model.encode_text(tokenizer(texts[i:i + batch], context_length).to(device)).float()
                         for i in range(0, len(texts), batch)])
        rows.append(F.normalize(F.normalize(emb, dim=-1).mean(dim=0), dim=0))
    rows = torch.stack(rows)
    if len(rows) > 1 and (rows - rows[0]).abs().max() < 1e-6:
        raise ValueError(f'the {len(rows)} class embeddings are all the same (names cut off at {context_length} '
                         'tokens?): the scores would be constant')
    return rows


def _all_reduce(t):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _readable(batch, counts):
    """The images of a loader batch (pixels, labels, indices[, BAD_KINDS index or -1 each]) that
    could be read, as (pixels, labels, indices); the others are added to `counts` by kind."""
    if len(batch) < 4:
        return batch[:3]
    bad = torch.as_tensor(batch[3])
    counts += torch.bincount(bad[bad >= 0], minlength=len(guard.BAD_KINDS))
    return tuple(t[bad < 0] for t in batch[:3])


def _skip_report(skipped, scored, what):
    """{kind: count} of the skipped images; a DataError when nothing could be scored."""
    by_kind = {k: n for k, n in zip(guard.BAD_KINDS, skipped) if n}
    if not scored:
        raise guard.DataError(f'none of the {sum(skipped)} evaluation {what} could be scored, every image was '
                             f'skipped ({by_kind or "no images"}); the warnings above name files')
    return by_kind


@torch.no_grad()
def zero_shot_eval(model, loader, classifier, *, label_ids, device, mean, std, autocast):
    """Top-1/top-5 accuracy (%) of image . classifier^T (no temperature) over the images that could
    be read, each counted once: the counts, skipped images by kind included, are summed over ranks
    in one int64 all-reduce that every rank issues, however many of its images failed (a rank
    with none left still takes part). Row k of the classifier is the class whose label is
    label_ids[k]. No image scored on any rank is a DataError, on every rank."""
    label_ids = torch.as_tensor(label_ids, device=device)
    counts = torch.zeros(3, dtype=torch.long, device=device)  # int64: a dtype every backend reduces
    skipped = torch.zeros(len(guard.BAD_KINDS), dtype=torch.long)
    for batch in loader:
        pixels, labels, _ = _readable(batch, skipped)
        if not len(labels):
            continue
        with autocast:
            pixels = images.to_device(pixels, torch.device(device))
            feats = model.encode_image(images.normalize_images(pixels, mean, std))
        logits = F.normalize(feats.float(), dim=-1) @ classifier.T
        labels = labels.to(device)
        top5 = label_ids[logits.topk(min(5, logits.shape[1]), dim=1).indices]
        counts[0] += (top5[:, 0] == labels).sum()
        counts[1] += (top5 == labels[:, None]).any(dim=1).sum()
        counts[2] += labels.numel()
    top1, top5, scored, *skipped = _all_reduce(torch.cat([counts, skipped.to(device)])).tolist()
    by_kind = _skip_report(skipped, scored, 'images')
    return {'zeroshot_top1': 100 * top1 / scored, 'zeroshot_top5': 100 * top5 / scored, 'images': scored,
            'images_skipped': sum(skipped), 'skipped': by_kind}


def retrieval_metrics(image_emb, text_emb, ks=(1, 5, 10)):
    """R@k both ways for paired, normalised [N, D] embeddings (pair i is the match of i)."""
    sims = image_emb @ text_emb.T
    target = torch.arange(len(sims), device=sims.device)
    out = {}
    for name, s in (('i2t', sims), ('t2i', sims.T)):
        rank = (s > s[target, target][:, None]).sum(dim=1)  # matches ranked strictly above
        for k in ks:
            out[f'{name}_R@{k}'] = 100 * (rank < k).float().mean().item()
    return out


# ----------------------------------------------------------------------------------------------
# Evaluation data: the ImageNet-val JSON Lines layout, checked line by line; unreadable images skipped
# ----------------------------------------------------------------------------------------------

def read_eval_meta(meta):
    """(records, line numbers) of an evaluation meta file, every line checked before any image is
    scored: a malformed one is a ValueError naming meta:line (blank lines and a byte-order mark
    are accepted)."""
    if not Path(meta).is_file():
        raise FileNotFoundError(f'evaluation meta file not found (or not a regular file): {meta}')
    records, lines, names = [], [], {}
    with open(meta, 'rb') as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode('utf-8-sig')
                if line.strip():
                    records.append(check_eval_record(json.loads(line), names, n))
                    lines.append(n)
            except ValueError as e:  # UnicodeDecodeError and JSONDecodeError included
                raise ValueError(f'{meta}:{n}: {e}') from None
    if not records:
        raise ValueError(f'{meta}: no evaluation images')
    return records, lines


def check_eval_record(rec, names, n):
    """`rec` if it is an object with a filename and a non-negative int label (if any) that has one
    label_name across the file (`names`: label -> (name, line) so far); else a ValueError."""
    if not isinstance(rec, dict):
        raise ValueError(f'expected a JSON object, got {type(rec).__name__}')
    if not isinstance(rec.get('filename'), str) or not rec['filename']:
        raise ValueError('"filename" must be a non-empty string')
    label, name = rec.get('label'), rec.get('label_name')
    if 'label' in rec and (not isinstance(label, int) or isinstance(label, bool) or label < 0):
        raise ValueError(f'"label" must be a non-negative integer, got {label!r}')
    if 'label_name' in rec and (not isinstance(name, str) or not name.strip()):
        raise ValueError(f'"label_name" must be a non-empty string, got {name!r}')
    if 'label' in rec and 'label_name' in rec:
        first = names.setdefault(label, (name, n))
        if first[0] != name:
            raise ValueError(f'label {label} is named {name!r} here but {first[0]!r} on line {first[1]}')
    return rec


def check_eval_set(root, meta, probe=64):
    """Before anything is computed: every line of the meta file (read_eval_meta), and the image
    folder, which must hold one of the first `probe` images listed (a wrong folder would otherwise
    show only as every image skipped, after a whole pass); else a ValueError naming them."""
    records, _ = read_eval_meta(meta)
    if not Path(root or '.').is_dir():
        raise ValueError(f'image folder not found: {root}')
    reasons = []
    for rec in records[:probe]:
        try:
            path = guard.confined_path(root, rec['filename'])
        except guard.BadSample as e:
            reasons.append(str(e))
            continue
        if os.path.isfile(path):
            return
        reasons.append(f'no file {path}')
    raise ValueError(f'none of the first {len(reasons)} images of {meta} is a file under {root!r} ({reasons[0]}); '
                     f'check the image folder and the filenames')


class EvalDataset(torch.utils.data.Dataset):
    """Labelled images in the ImageNet-val JSON Lines layout (filename, label, label_name[, caption]);
    this rank's share is indices rank, rank+W, ... (no padding duplicates). The meta file is
    checked whole when read (read_eval_meta). Items are (uint8 view, label or -1, record index,
    guard.BAD_KINDS index or -1): an image that cannot be read (handled as training samples are:
    regular files inside the root, bounded bytes and time) gives zeros and its kind, for
    evaluation to skip and count; the first few of each process are named in a warning."""

    def __init__(self, root, meta, *, rank=0, world=1, image_size=224, max_pixels=1 << 28,
                 max_file_bytes=guard.MAX_FILE_BYTES, sample_timeout_s=guard.SAMPLE_TIMEOUT_S):
        self.root, self.meta, self.image_size, self.max_pixels = root, meta, image_size, max_pixels
        self.max_file_bytes, self.sample_timeout_s = max_file_bytes, sample_timeout_s
        self.records, self.lines = read_eval_meta(meta)
        self.indices = list(range(rank, len(self.records), world))
        self.warned = 0

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        index = self.indices[i]
        rec = self.records[index]
        view, kind, detail = guard.guarded(lambda: self.view(rec['filename']), self.sample_timeout_s)
        if kind is not None:
            view = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)
            if self.warned < 5:
                self.warned += 1
                print(f'warning: evaluation image skipped, {self.where(index)}: {detail}', flush=True)
        return view, rec.get('label', -1), index, -1 if kind is None else guard.BAD_KINDS.index(kind)

    def view(self, filename):
        img = guard.open_image(guard.confined_path(self.root, filename), self.max_pixels, max_bytes=self.max_file_bytes)
        return images.eval_view(img, size=self.image_size)

    def where(self, index):
        return f'{self.meta}:{self.lines[index]}'

    def classes(self):
        """(label, name) pairs of the classes in the file, sorted by label (the reference's order)."""
        for index, rec in enumerate(self.records):
            if 'label' not in rec or 'label_name' not in rec:
                raise ValueError(f'{self.where(index)}: no "label" and "label_name", which zero-shot classes '
                                 f'come from (or give a class-name list)')
        return sorted({r['label']: r['label_name'] for r in self.records}.items())

    def check_labels(self, label_ids):
        """A ValueError naming meta:line unless every record's label is one of `label_ids`."""
        known = set(label_ids)
        for index, rec in enumerate(self.records):
            if rec.get('label') not in known:
                raise ValueError(f'{self.where(index)}: label {rec.get("label")!r} is not one of the {len(known)} '
                                 f'classes evaluated ({min(known)}..{max(known)})')

    def captions(self):
        """The first caption of every record (retrieval); a missing one is a ValueError naming meta:line."""
        out = []
        for index, rec in enumerate(self.records):
            try:
                out.append(data.first_caption(rec.get('caption')))
            except data.RecordError:
                raise ValueError(f'{self.where(index)}: no caption (retrieval needs one per image)') from None
        return out


# ----------------------------------------------------------------------------------------------
# Evaluation of a model, and the CLI
# ----------------------------------------------------------------------------------------------

def _loader(ds, batch, workers, pin=False):
    return torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, pin_memory=pin)


def evaluate(model, *, val_root, val_meta, task, prompts, class_names, batch, workers, device,
             autocast, tokenizer=None, rank=0, world=1, max_file_bytes=guard.MAX_FILE_BYTES,
             sample_timeout_s=guard.SAMPLE_TIMEOUT_S):
    """Run one task on this rank's share; every rank gets the merged metrics. The meta file is
    checked first: a malformed line, or a label outside the classes evaluated, is a ValueError
    naming file:line. Images that cannot be read are skipped and counted by kind ('skipped'); the
    metrics are over the images scored. `tokenizer`: the model's own vocabulary
    (config.data.bpe_path; default: weights.load_model's bpe_path, else the data folder's)."""
    if task not in ('zeroshot', 'retrieval'):
        raise ValueError(f'unknown task {task!r} (zeroshot, retrieval)')
    if task == 'retrieval' and world > 1:
        raise ValueError('retrieval runs in a single process')
    tokenizer = tokenizer or data.get_tokenizer(getattr(model, 'bpe_path', data.BPE_PATH))
    ds = EvalDataset(val_root, val_meta, rank=rank, world=world, image_size=model.cfg.image_size,
                     max_file_bytes=max_file_bytes, sample_timeout_s=sample_timeout_s)
    mean, std = getattr(model, 'mean', images.IMAGENET_MEAN), getattr(model, 'std', images.IMAGENET_STD)
    ctx, loader = model.cfg.context_length, _loader(ds, batch, workers, pin=torch.device(device).type != 'cpu')
    if task == 'zeroshot':
        if class_names:  # a full list in label order, e.g. the 1,000 ImageNet names
            label_ids, names = list(range(len(class_names))), class_names
        else:            # the classes of the evaluation file, sorted by label (as the reference)
            label_ids, names = map(list, zip(*ds.classes()))
        ds.check_labels(label_ids)
        classifier = zero_shot_classifier(model, names, text.load_prompts(prompts), tokenizer=tokenizer,
                                          context_length=ctx, device=device)
        metrics = zero_shot_eval(model, loader, classifier, label_ids=label_ids, device=device, mean=mean, std=std,
                                 autocast=autocast)
    else:
        metrics = retrieval(model, loader, ds.captions(), tokenizer=tokenizer, device=device, mean=mean, std=std,
                            autocast=autocast)
    if rank == 0 and metrics['skipped']:
        print(f'warning: {sum(metrics["skipped"].values())} evaluation images skipped {metrics["skipped"]}; '
              f'the metrics are over the images scored', flush=True)
    return metrics


@torch.no_grad()
def retrieval(model, loader, captions, *, tokenizer, device, mean, std, autocast):
    """R@k both ways over the pairs whose image could be read (the others skipped, counted by kind)."""
    img, txt = [], []
    skipped = torch.zeros(len(guard.BAD_KINDS), dtype=torch.long)
    for batch in loader:
        pixels, _, index = _readable(batch, skipped)
        if not len(index):
            continue
        texts = tokenizer([captions[i] for i in index.tolist()], model.cfg.context_length).to(device)
        with autocast:
            feats = model.encode_image(images.normalize_images(pixels.to(device), mean, std))
            img.append(F.normalize(feats.float(), dim=-1))
            txt.append(F.normalize(model.encode_text(texts).float(), dim=-1))
    pairs = sum(len(t) for t in img)
    by_kind = _skip_report(skipped.tolist(), pairs, 'pairs')
    return {**retrieval_metrics(torch.cat(img), torch.cat(txt)), 'pairs': pairs,
            'pairs_skipped': sum(by_kind.values()), 'skipped': by_kind}


def result_path(out, ckpt, task):
    """Where the JSON goes (`out`, else beside the checkpoint), checked before any work: its folder
    must exist and be writable, so that a finished evaluation is never lost to a typo."""
    path = Path(out or (str(Path(ckpt).with_suffix('')) + f'.{task}.json'))
    if path.is_dir() or not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        flag = f'--out {out!r}' if out else f'the checkpoint folder {str(path.parent)!r} (set --out)'
        raise SystemExit(f'{flag}: {path} cannot be written (its folder must exist and be writable, '
                         f'and it must not be a folder)')
    return path


def report(metrics, out, task):
    """Print the metrics and write them as JSON to `out`; a failed write says so, the metrics printed."""
    width = max(len(k) for k in metrics)
    print('\n'.join(f'{k:<{width}}  {v:.2f}' if isinstance(v, float) else f'{k:<{width}}  {v}'
                    for k, v in metrics.items()))
    scored, skipped = ('images', 'images_skipped') if task == 'zeroshot' else ('pairs', 'pairs_skipped')
    print(f'(over the {metrics[scored]} {scored} scored; {metrics[skipped]} skipped, by kind: {metrics["skipped"]})')
    try:
        out.write_text(json.dumps(metrics, indent=2))
    except OSError as e:
        raise SystemExit(f'could not write {out} ({e}); the metrics are printed above') from None
    print(f'wrote {out}')


def main(_argv):
    ckpt = weights.checkpoint_file(FLAGS.ckpt)
    if FLAGS.export:
        print('wrote', *weights.export_open_clip(weights.load_model(ckpt, act=FLAGS.act or None)[0], FLAGS.export))
        return
    out = result_path(FLAGS.out, ckpt, FLAGS.task)
    device, device_type = runtime.setup_device(runtime.dist_env()[2])
    runtime.check_precisions(device_type, {'--precision': FLAGS.precision})
    with runtime.processes(device_type, FLAGS.timeout_s) as (rank, world):
        model, _ = weights.load_model(ckpt, act=FLAGS.act or None)
        run_config = model.run_config
        run_data = run_config.get('data', {})
        limits = run_data.get('limits', {})   # the run's bounds on one image's bytes and time
        val_root = FLAGS.val_root or run_data.get('val_root', '')
        val_meta = FLAGS.val_meta or run_data.get('val_meta', '')
        prompts = FLAGS.prompts or run_config.get('eval', {}).get('prompts') or 'prompt80'
        if not val_meta:
            raise SystemExit('no evaluation set: pass --val_root and --val_meta')
        try:
            check_eval_set(val_root, val_meta)
            if FLAGS.task == 'zeroshot':
                text.load_prompts(prompts)
        except (ValueError, OSError) as e:
            raise SystemExit(f'--val_root {val_root!r} / --val_meta {val_meta!r} / --prompts {prompts!r} '
                             f'(unset flags: the checkpoint\'s config): {e}') from None
        names = None
        if FLAGS.classnames:
            names = [n.strip() for n in Path(FLAGS.classnames).read_text().splitlines() if n.strip()]
        _, autocast, _ = runtime.precision(FLAGS.precision, device_type)
        bounds = dict(max_file_bytes=guard.MAX_FILE_BYTES, sample_timeout_s=guard.SAMPLE_TIMEOUT_S)
        try:   # every rank meets these errors alike (same classifier, all-reduced counts): none waits
            metrics = evaluate(model.to(device), val_root=val_root, val_meta=val_meta, task=FLAGS.task, prompts=prompts,
                               class_names=names, batch=FLAGS.batch_size, workers=FLAGS.workers, device=device,
                               autocast=autocast, rank=rank, world=world, **{k: limits.get(k, v) for k, v in bounds.items()})
        except (ValueError, guard.DataError) as e:
            raise SystemExit(f'{ckpt}: nothing scored: {e}') from None
        if rank == 0:
            report({'checkpoint': str(ckpt), 'kind': model.kind, 'task': FLAGS.task,
                    'prompts': prompts if FLAGS.task == 'zeroshot' else None, **metrics}, out, FLAGS.task)


def define_flags():
    flags.DEFINE_string('ckpt', None, 'checkpoint: ours (.pt; or a workdir: its newest readable one), DeCLIP '
                        'reference (.pth.tar), OpenAI or open_clip state dict')
    flags.DEFINE_enum('task', 'zeroshot', ['zeroshot', 'retrieval'], 'what to evaluate')
    flags.DEFINE_string('val_root', '', 'image folder (default: the checkpoint config\'s data.val_root)')
    flags.DEFINE_string('val_meta', '', 'JSON Lines meta (filename, label, label_name[, caption])')
    flags.DEFINE_string('classnames', '', 'optional file of class names, one per line in label order '
                        f'(e.g. {IMAGENET_CLASSNAMES.relative_to(ROOT)})')
    flags.DEFINE_string('prompts', '', 'prompt1, prompt6, prompt8, prompt80, cc or file:<path> (default: the '
                        'checkpoint config\'s eval.prompts, else prompt80)')
    flags.DEFINE_enum('act', '', ['', 'quick_gelu', 'gelu'], 'the towers\' activation, for a state dict that does '
                      'not say (no open_clip_config.json beside it; default: OpenAI CLIP\'s quick_gelu)')
    flags.DEFINE_integer('batch_size', 256, 'images per batch')
    flags.DEFINE_integer('workers', min(8, os.cpu_count() or 1), 'loader workers')
    flags.DEFINE_enum('precision', 'fp32', ['fp32', 'bf16', 'fp16', 'auto'],
                      'fp32 reproduces published numbers; auto: bf16 where supported, else fp16')
    flags.DEFINE_string('export', '', 'write the towers in open_clip\'s layout to this folder; no evaluation')
    flags.DEFINE_integer('timeout_s', 1800, 'collective timeout under torchrun')
    flags.DEFINE_string('out', '', 'JSON output (default: beside the checkpoint)')
    flags.mark_flag_as_required('ckpt')


if __name__ == '__main__':
    define_flags()
    app.run(main)
