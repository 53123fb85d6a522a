"""Zero-shot classification and image-text retrieval, the evaluation dataset; loading of our,
DeCLIP-reference and OpenAI weights, export to open_clip's layout, inference on one's own data.

    python evaluate.py --ckpt runs/demo/checkpoints/last.pt
    python evaluate.py --ckpt declip_vitb32.pth.tar --val_root /data/imagenet/val --val_meta val_official.json
    torchrun --nproc_per_node 8 evaluate.py --ckpt runs/r50/checkpoints/last.pt --prompts prompt80
    python evaluate.py --ckpt runs/demo/checkpoints/last.pt --task retrieval
    python evaluate.py --ckpt runs/demo/checkpoints/last.pt --export exports/demo   # open_clip layout
"""
import json
import math
import os
from pathlib import Path

import ml_collections
import torch
import torch.distributed as dist
import torch.nn.functional as F
from absl import app, flags

import data
import declip
import images
import runtime
import text

FLAGS = flags.FLAGS
ROOT = Path(__file__).resolve().parent
IMAGENET_CLASSNAMES = ROOT / 'assets' / 'imagenet_classnames.txt'
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------
# Prompt ensembles and metrics
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def zero_shot_classifier(model, class_names, templates, *, tokenizer, context_length, device, batch=1024):
    """[C, D] class embeddings: normalise(mean(normalise(embedding of each prompt)))."""
    rows = []
    for texts in text.class_prompts(class_names, templates):
        emb = torch.cat([model.encode_text(tokenizer(texts[i:i + batch], context_length).to(device)).float()
                         for i in range(0, len(texts), batch)])
        rows.append(F.normalize(F.normalize(emb, dim=-1).mean(dim=0), dim=0))
    return torch.stack(rows)


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
    counts += torch.bincount(bad[bad >= 0], minlength=len(data.BAD_KINDS))
    return tuple(t[bad < 0] for t in batch[:3])


def _skip_report(skipped, scored, what):
    """{kind: count} of the skipped images; a DataError when nothing could be scored."""
    by_kind = {k: n for k, n in zip(data.BAD_KINDS, skipped) if n}
    if not scored:
        raise data.DataError(f'none of the {sum(skipped)} evaluation {what} could be scored, every image was '
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
    skipped = torch.zeros(len(data.BAD_KINDS), dtype=torch.long)
    for batch in loader:
        pixels, labels, _ = _readable(batch, skipped)
        if not len(labels):
            continue
        with autocast:
            feats = model.encode_image(images.normalize_images(pixels.to(device, non_blocking=True), mean, std))
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


class EvalDataset(torch.utils.data.Dataset):
    """Labelled images in the ImageNet-val JSON Lines layout (filename, label, label_name[, caption]);
    this rank's share is indices rank, rank+W, ... (no padding duplicates). The meta file is
    checked whole when read (read_eval_meta). Items are (uint8 view, label or -1, record index,
    data.BAD_KINDS index or -1): an image that cannot be read (handled as training samples are:
    regular files inside the root, bounded bytes and time) gives zeros and its kind, for
    evaluation to skip and count; the first few of each process are named in a warning."""

    def __init__(self, root, meta, *, rank=0, world=1, image_size=224, max_pixels=1 << 28,
                 max_file_bytes=data.MAX_FILE_BYTES, sample_timeout_s=data.SAMPLE_TIMEOUT_S):
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
        view, kind, detail = data.guarded(lambda: self.view(rec['filename']), self.sample_timeout_s)
        if kind is not None:
            view = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)
            if self.warned < 5:
                self.warned += 1
                print(f'warning: evaluation image skipped, {self.where(index)}: {detail}', flush=True)
        return view, rec.get('label', -1), index, -1 if kind is None else data.BAD_KINDS.index(kind)

    def view(self, filename):
        img = images.open_image(data.confined_path(self.root, filename), self.max_pixels, max_bytes=self.max_file_bytes)
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
            except images.BadSample:
                raise ValueError(f'{self.where(index)}: no caption (retrieval needs one per image)') from None
        return out


# ----------------------------------------------------------------------------------------------
# Checkpoint loading: ours, DeCLIP reference (.pth.tar), OpenAI CLIP state dicts
# ----------------------------------------------------------------------------------------------

def _strip(sd, prefix):
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def infer_model_config(sd):
    """The model block of a config from state-dict shapes (reference and OpenAI layouts)."""
    text_width = sd['encode_text.token_embedding.weight'].shape[1]
    text_layers = len({k.split('.')[3] for k in sd if k.startswith('encode_text.transformer.resblocks.')})
    if 'visual.proj' in sd:
        width = sd['visual.conv1.weight'].shape[0]
        patch = sd['visual.conv1.weight'].shape[-1]
        grid = round(math.sqrt(sd['visual.positional_embedding'].shape[0] - 1))
        vision = dict(declip.ViT_B32, vision_width=width, patch_size=patch, image_size=grid * patch,
                      vision_layers=len({k.split('.')[3] for k in sd if k.startswith('visual.transformer.resblocks.')}),
                      vision_heads=width // 64, embed_dim=sd['visual.proj'].shape[1])
    else:
        layers = tuple(len({k.split('.')[2] for k in sd if k.startswith(f'visual.layer{i}.')}) for i in (1, 2, 3, 4))
        width = sd['visual.conv3.weight'].shape[0]
        grid = round(math.sqrt(sd['visual.attnpool.positional_embedding'].shape[0] - 1))
        vision = dict(declip.R50, vision_layers=layers, vision_width=width, vision_heads=width * 32 // 64,
                      image_size=grid * 32, embed_dim=sd['visual.attnpool.c_proj.weight'].shape[0])
    cfg = declip.model_config(vision, declip='text_label_predictor.weight' in sd)
    cfg.update(dict(text_width=text_width, text_layers=text_layers, text_heads=text_width // 64,
                    context_length=sd['encode_text.positional_embedding'].shape[0],
                    vocab_size=sd['encode_text.token_embedding.weight'].shape[0]))
    if cfg.declip:
        cfg.simsiam_dim = sd['projector.linear1.weight'].shape[0]
        cfg.predictor_dim = sd['predictor.linear1.weight'].shape[0]
    return cfg


def from_openai(sd):
    """OpenAI CLIP names -> ours: text tower under encode_text., token rows moved so that
    sot/eot land on DeCLIP's ids (49407/49408; <|mask|> 49406 gets zeros), text_projection
    parameter [width, embed] -> Linear weight (transposed) with zero bias (open_clip's `proj_bias`
    Linear, text_projection.weight / .bias, is taken as it is), scalar logit scale -> [1]."""
    out = {k: v for k, v in sd.items() if k.startswith('visual.')}
    for k, v in sd.items():
        if k.startswith(('transformer.', 'ln_final.', 'positional_embedding', 'text_projection.')):
            out['encode_text.' + k] = v
    emb = sd['token_embedding.weight']
    new = torch.zeros(text.VOCAB_SIZE, emb.shape[1], dtype=emb.dtype)
    new[:text.MASK_ID] = emb[:text.MASK_ID]
    new[text.SOT_ID], new[text.EOT_ID] = emb[49406], emb[49407]
    out['encode_text.token_embedding.weight'] = new
    if 'text_projection' in sd:
        proj = sd['text_projection']
        out['encode_text.text_projection.weight'] = proj.T.contiguous()
        out['encode_text.text_projection.bias'] = torch.zeros(proj.shape[1], dtype=proj.dtype)
    out['logit_scale'] = sd['logit_scale'].reshape(1)
    return out


def to_open_clip(model):
    """(state dict, open_clip_config.json object) of the image and text towers in open_clip's
    layout: OpenAI CLIP's names, token rows moved back to OpenAI's ids (sot/eot 49406/49407; the
    <|mask|> row dropped: 49,408 rows), a scalar logit scale. DeCLIP's text projection has a bias,
    which cannot in general be folded into weights (it follows ln_final and pooling; ln_final's
    bias could absorb it only where the projection is onto, which R50's 512 -> 1024 is not), so
    the text tower is open_clip's with `proj_bias` (text_projection.weight [embed, width] and
    .bias). QuickGELU and the model's own mean/std are in the config."""
    cfg = model.cfg
    sd = {k: v for k, v in model.state_dict().items() if k.startswith('visual.')}
    sd |= {k: v for k, v in model.encode_text.state_dict().items() if k != 'token_embedding.weight'}
    emb = model.encode_text.token_embedding.weight.detach()
    sd['token_embedding.weight'] = torch.cat([emb[:text.MASK_ID], emb[text.SOT_ID:]])
    sd['logit_scale'] = model.logit_scale.detach().reshape(())
    resnet = cfg.vision == 'resnet'   # open_clip's heads: width (x 32 for a ResNet) // head_width
    vision_cfg = dict(image_size=cfg.image_size, width=cfg.vision_width, patch_size=None if resnet else cfg.patch_size,
                      layers=list(cfg.vision_layers) if resnet else cfg.vision_layers,
                      head_width=cfg.vision_width * (32 if resnet else 1) // cfg.vision_heads)
    text_cfg = dict(context_length=cfg.context_length, vocab_size=len(sd['token_embedding.weight']),
                    width=cfg.text_width, heads=cfg.text_heads, layers=cfg.text_layers, proj_bias=True)
    mean, std = getattr(model, 'mean', images.IMAGENET_MEAN), getattr(model, 'std', images.IMAGENET_STD)
    return sd, {'model_cfg': dict(embed_dim=cfg.embed_dim, quick_gelu=True, vision_cfg=vision_cfg, text_cfg=text_cfg),
                'preprocess_cfg': dict(mean=list(mean), std=list(std), interpolation='bilinear')}


def export_open_clip(model, out_dir):
    """Write to_open_clip's weights and config in open_clip's folder layout (what its
    'local-dir:' and 'hf-hub:' model names read); returns the two paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd, config = to_open_clip(model)
    runtime.save_checkpoint(out / 'open_clip_pytorch_model.bin', sd)
    (out / 'open_clip_config.json').write_text(json.dumps(config, indent=2))
    return out / 'open_clip_pytorch_model.bin', out / 'open_clip_config.json'


def _openai_norm(path):
    """OpenAI's mean/std, or those of an open_clip_config.json beside `path` (an export), whose
    text tower must then be QuickGELU's, as ours (GELU weights would give other features)."""
    config = Path(path).parent / 'open_clip_config.json'
    if not config.is_file():
        return OPENAI_MEAN, OPENAI_STD
    try:
        found = json.loads(config.read_text())
        pre, quick_gelu = found.get('preprocess_cfg', {}), found['model_cfg'].get('quick_gelu', False)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f'{config}: not an open_clip config ({type(e).__name__}: {e})') from None
    if not quick_gelu:
        raise ValueError(f'{config}: a GELU model (quick_gelu is not true); this code builds QuickGELU towers')
    return tuple(pre.get('mean', OPENAI_MEAN)), tuple(pre.get('std', OPENAI_STD))


def checkpoint_kind(obj):
    """'ours', 'reference' or 'openai'; anything else is a ValueError saying what was expected."""
    expected = ('expected a dict: a checkpoint of ours (model, config, step), a DeCLIP reference '
                'checkpoint (model or state_dict) or a state dict of parameter names and tensors')
    if not isinstance(obj, dict):
        raise ValueError(f'{expected}; got {type(obj).__name__}')
    if 'model' in obj and 'config' in obj and 'step' in obj:
        if not isinstance(obj['model'], dict) or not isinstance(obj['config'], dict) or 'model' not in obj['config']:
            raise ValueError(f'{expected}; got "model" {type(obj["model"]).__name__}, "config" '
                             f'{type(obj["config"]).__name__} without a model block')
        return 'ours'
    sd = obj.get('model', obj.get('state_dict', obj))
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise ValueError(f'{expected}; got a {type(sd).__name__} where parameter names should be')
    keys = list(sd)
    if any(k.startswith(('module.encode_text.', 'encode_text.')) for k in keys):
        return 'reference'
    if 'token_embedding.weight' in keys and any(k.startswith('visual.') for k in keys):
        return 'openai'
    raise ValueError(f'unrecognised checkpoint layout (first keys: {keys[:5]})')


HEADS = ('projector.', 'predictor.', 'text_label_predictor.')   # training-only heads


def _check_keys(path, sd, model):
    """A RuntimeError naming `path` unless `sd` holds every tower tensor of `model`, shaped as
    there, and nothing else (the training heads may be missing or extra)."""
    want = model.state_dict()
    missing = [k for k in want if k not in sd and not k.startswith(HEADS)]
    unexpected = [k for k in sd if k not in want and not k.startswith(HEADS)]
    shapes = [f'{k} {tuple(sd[k].shape)}, expected {tuple(v.shape)}' for k, v in want.items()
              if k in sd and not k.startswith(HEADS) and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise RuntimeError(f'{path}: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}, '
                           f'shape mismatches {shapes[:8]}')


def _read(path):
    """(state dict in our names, model config, {kind, mean, std, run_config}) of a checkpoint file,
    its tower tensors checked against the config (on the meta device: no memory, no time)."""
    obj = runtime.safe_load(path)
    try:
        kind = checkpoint_kind(obj)
    except ValueError as e:
        raise ValueError(f'{path}: {e}') from None
    info = dict(kind=kind, mean=images.IMAGENET_MEAN, std=images.IMAGENET_STD, run_config={})
    if kind == 'ours':
        sd, cfg, info['run_config'] = obj['model'], ml_collections.ConfigDict(obj['config']).model, obj['config']
    else:
        sd = _strip(obj.get('model', obj.get('state_dict', obj)) if kind == 'reference' else obj, 'module.')
        if kind == 'openai':
            sd = from_openai(sd)
            info['mean'], info['std'] = _openai_norm(path)
        sd = {k: v for k, v in sd.items() if not k.startswith('visual.fc.')}
        if 'logit_scale' in sd:
            sd['logit_scale'] = sd['logit_scale'].reshape(1)
        try:
            cfg = infer_model_config(sd)
        except KeyError as e:
            raise ValueError(f'{path}: no {e} (needed to infer the model)') from None
    with torch.device('meta'):
        _check_keys(path, sd, declip.build_model(cfg))
    return sd, cfg, info


def load_weights(path):
    """(state dict, model config) of our checkpoint, a DeCLIP reference .pth.tar or an OpenAI CLIP
    (or open_clip export) state dict, to start a new run from: the config is the file's (ours) or
    inferred from shapes (CLIP, declip False, when the file has no heads). Keys in our names:
    visual.* (OpenAI's), encode_text.* and logit_scale [1], always; projector.*, predictor.*,
    text_label_predictor.* only where the file has them (DeCLIP runs; not CLIP runs, OpenAI
    files), else they keep their fresh init under load_state_dict(strict=False); the reference's
    visual.fc.* dropped. OpenAI token rows land on DeCLIP's ids (sot/eot 49406/49407 ->
    49407/49408), the <|mask|> row 49406 is zeros, the bias-free text_projection becomes a
    Linear with zero bias. Every tower tensor is checked present and shaped as the config says
    (a RuntimeError naming the file)."""
    return _read(path)[:2]


def load_model(path, config=None):
    """(model in eval mode, preprocess) for the files load_weights reads. `preprocess` maps a PIL
    image to the normalised [3, S, S] tensor the weights expect (ImageNet mean/std; OpenAI's for
    OpenAI weights, an export's own). The model carries kind, mean, std, run_config, bpe_path and
    tokenize(texts): int64 ids [len(texts), context length] in the model's own vocabulary."""
    sd, cfg, info = _read(path)
    if config is not None:
        cfg = config.model if 'model' in config else config
    model = declip.build_model(cfg)
    _check_keys(path, sd, model)
    model.load_state_dict(sd, strict=False)
    model.eval()
    for name, value in info.items():
        setattr(model, name, value)
    bpe_path = Path(model.run_config['data']['bpe_path']) if model.kind == 'ours' else data.BPE_PATH
    if not bpe_path.is_file():
        print(f'warning: {path} was trained with the vocabulary {bpe_path}, which is not here; '
              f'using {data.BPE_PATH}', flush=True)
        bpe_path = data.BPE_PATH
    model.bpe_path = bpe_path
    model.tokenize = lambda texts: data.get_tokenizer(bpe_path)(texts, cfg.context_length)
    size, mean, std = cfg.image_size, model.mean, model.std

    def preprocess(img):
        return images.normalize_images(images.eval_view(img, size=size)[None], mean, std)[0]
    return model, preprocess


@torch.no_grad()
def predict(model, pixels, texts):
    """(unit-norm image embeddings [B, D], unit-norm text embeddings [T, D], probabilities [B, T])
    of preprocessed images [B, 3, S, S] and a list of strings (load_model's model): the
    probabilities are softmax over the texts of scale * cosine, the scale as in training."""
    img = F.normalize(model.encode_image(pixels).float(), dim=-1)
    txt = F.normalize(model.encode_text(model.tokenize(texts).to(pixels.device)).float(), dim=-1)
    return img, txt, (declip.capped_scale(model.logit_scale.float()) * img @ txt.T).softmax(dim=-1)


# ----------------------------------------------------------------------------------------------
# Evaluation of a model, and the CLI
# ----------------------------------------------------------------------------------------------

def _loader(ds, batch, workers):
    return torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, pin_memory=False)


def evaluate(model, *, val_root, val_meta, task, prompts, class_names, batch, workers, device,
             autocast, tokenizer=None, rank=0, world=1, max_file_bytes=data.MAX_FILE_BYTES,
             sample_timeout_s=data.SAMPLE_TIMEOUT_S):
    """Run one task on this rank's share; every rank gets the merged metrics. The meta file is
    checked first: a malformed line, or a label outside the classes evaluated, is a ValueError
    naming file:line. Images that cannot be read are skipped and counted by kind ('skipped'); the
    metrics are over the images scored. `tokenizer`: the model's own vocabulary
    (config.data.bpe_path; default: load_model's bpe_path, else the data folder's)."""
    if task not in ('zeroshot', 'retrieval'):
        raise ValueError(f'unknown task {task!r} (zeroshot, retrieval)')
    if task == 'retrieval' and world > 1:
        raise ValueError('retrieval runs in a single process')
    tokenizer = tokenizer or data.get_tokenizer(getattr(model, 'bpe_path', data.BPE_PATH))
    ds = EvalDataset(val_root, val_meta, rank=rank, world=world, image_size=model.cfg.image_size,
                     max_file_bytes=max_file_bytes, sample_timeout_s=sample_timeout_s)
    mean, std = getattr(model, 'mean', images.IMAGENET_MEAN), getattr(model, 'std', images.IMAGENET_STD)
    ctx = model.cfg.context_length
    if task == 'zeroshot':
        if class_names:  # a full list in label order, e.g. the 1,000 ImageNet names
            label_ids, names = list(range(len(class_names))), class_names
        else:            # the classes of the evaluation file, sorted by label (as the reference)
            label_ids, names = map(list, zip(*ds.classes()))
        ds.check_labels(label_ids)
        classifier = zero_shot_classifier(model, names, text.load_prompts(prompts), tokenizer=tokenizer,
                                          context_length=ctx, device=device)
        metrics = zero_shot_eval(model, _loader(ds, batch, workers), classifier, label_ids=label_ids,
                                 device=device, mean=mean, std=std, autocast=autocast)
    else:
        metrics = retrieval(model, _loader(ds, batch, workers), ds.captions(), tokenizer=tokenizer,
                            device=device, mean=mean, std=std, autocast=autocast)
    if rank == 0 and metrics['skipped']:
        print(f'warning: {sum(metrics["skipped"].values())} evaluation images skipped {metrics["skipped"]}; '
              f'the metrics are over the images scored', flush=True)
    return metrics


@torch.no_grad()
def retrieval(model, loader, captions, *, tokenizer, device, mean, std, autocast):
    """R@k both ways over the pairs whose image could be read (the others skipped, counted by kind)."""
    img, txt = [], []
    skipped = torch.zeros(len(data.BAD_KINDS), dtype=torch.long)
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


def report(metrics, ckpt, task):
    """Print the metrics and write them as JSON (--out, else beside the checkpoint)."""
    width = max(len(k) for k in metrics)
    print('\n'.join(f'{k:<{width}}  {v:.2f}' if isinstance(v, float) else f'{k:<{width}}  {v}'
                    for k, v in metrics.items()))
    scored, skipped = ('images', 'images_skipped') if task == 'zeroshot' else ('pairs', 'pairs_skipped')
    print(f'(over the {metrics[scored]} {scored} scored; {metrics[skipped]} skipped, by kind: {metrics["skipped"]})')
    out = Path(FLAGS.out or (str(Path(ckpt).with_suffix('')) + f'.{task}.json'))
    out.write_text(json.dumps(metrics, indent=2))
    print(f'wrote {out}')


def main(argv):
    del argv
    if FLAGS.export:
        print('wrote', *export_open_clip(load_model(FLAGS.ckpt)[0], FLAGS.export))
        return
    device, device_type = runtime.setup_device(runtime.dist_env()[2])
    runtime.check_precisions(device_type, {'--precision': FLAGS.precision})
    with runtime.processes(device_type, FLAGS.timeout_s) as (rank, world):
        model, _ = load_model(FLAGS.ckpt)
        model.to(device)
        run_data = model.run_config.get('data', {})
        val_root = FLAGS.val_root or run_data.get('val_root', '')
        val_meta = FLAGS.val_meta or run_data.get('val_meta', '')
        if not val_meta:
            raise SystemExit('no evaluation set: pass --val_root and --val_meta')
        names = None
        if FLAGS.classnames:
            names = [n.strip() for n in Path(FLAGS.classnames).read_text().splitlines() if n.strip()]
        _, autocast, _ = runtime.precision(FLAGS.precision, device_type)
        metrics = evaluate(model, val_root=val_root, val_meta=val_meta, task=FLAGS.task, prompts=FLAGS.prompts,
                           class_names=names, batch=FLAGS.batch_size, workers=FLAGS.workers, device=device,
                           autocast=autocast, rank=rank, world=world,
                           max_file_bytes=run_data.get('max_file_bytes', data.MAX_FILE_BYTES),
                           sample_timeout_s=run_data.get('sample_timeout_s', data.SAMPLE_TIMEOUT_S))
        if rank == 0:
            report({'checkpoint': str(FLAGS.ckpt), 'kind': model.kind, 'task': FLAGS.task,
                    'prompts': FLAGS.prompts if FLAGS.task == 'zeroshot' else None, **metrics}, FLAGS.ckpt, FLAGS.task)


def define_flags():
    flags.DEFINE_string('ckpt', None, 'checkpoint: ours (.pt), DeCLIP reference (.pth.tar) or OpenAI state dict')
    flags.DEFINE_enum('task', 'zeroshot', ['zeroshot', 'retrieval'], 'what to evaluate')
    flags.DEFINE_string('val_root', '', 'image folder (default: the checkpoint config\'s data.val_root)')
    flags.DEFINE_string('val_meta', '', 'JSON Lines meta (filename, label, label_name[, caption])')
    flags.DEFINE_string('classnames', '', 'optional file of class names, one per line in label order '
                        f'(e.g. {IMAGENET_CLASSNAMES.relative_to(ROOT)})')
    flags.DEFINE_string('prompts', 'prompt80', 'prompt1, prompt6, prompt8, prompt80, cc or file:<path>')
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
