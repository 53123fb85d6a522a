"""Weights in and out: our checkpoints, DeCLIP reference checkpoints (.pth.tar), OpenAI CLIP and
open_clip state dicts into a model (to evaluate, to start a run from); export to open_clip's
folder layout; inference on one's own images and texts.

    model, preprocess = weights.load_model('runs/demo/checkpoints/last.pt')
    image_emb, text_emb, probs = weights.predict(model, preprocess(img)[None], ['a red circle'])
"""
import json
import math
from pathlib import Path

import ml_collections
import torch
import torch.nn.functional as F

import checkpoints
import data
import declip
import images
import text

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


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
    .bias). The activation (quick_gelu) and the model's own mean/std are in the config."""
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
    quick_gelu = cfg.get('act', 'quick_gelu') == 'quick_gelu'
    return sd, {'model_cfg': dict(embed_dim=cfg.embed_dim, quick_gelu=quick_gelu, vision_cfg=vision_cfg,
                                  text_cfg=text_cfg),
                'preprocess_cfg': dict(mean=list(mean), std=list(std), interpolation='bilinear')}


def export_open_clip(model, out_dir):
    """Write to_open_clip's weights and config in open_clip's folder layout (what its
    'local-dir:' and 'hf-hub:' model names read); returns the two paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd, config = to_open_clip(model)
    checkpoints.save_checkpoint(out / 'open_clip_pytorch_model.bin', sd)
    (out / 'open_clip_config.json').write_text(json.dumps(config, indent=2))
    return out / 'open_clip_pytorch_model.bin', out / 'open_clip_config.json'


def _open_clip_config(path):
    """(mean, std, activation) of the open_clip_config.json beside `path` (an export, an open_clip
    hub folder): open_clip's towers are GELU's unless quick_gelu is true. Without one, OpenAI's
    mean/std and None: a bare state dict does not say its activation."""
    config = Path(path).parent / 'open_clip_config.json'
    if not config.is_file():
        return OPENAI_MEAN, OPENAI_STD, None
    try:
        found = json.loads(config.read_text())
        pre, quick_gelu = found.get('preprocess_cfg', {}), found['model_cfg'].get('quick_gelu', False)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f'{config}: not an open_clip config ({type(e).__name__}: {e})') from None
    act = 'quick_gelu' if quick_gelu else 'gelu'
    return tuple(pre.get('mean', OPENAI_MEAN)), tuple(pre.get('std', OPENAI_STD)), act


def _activation(path, found, stated):
    """The towers' activation: the one the file says (`found`), which must be the one `stated`
    (model.act, --act) if any; for a file that does not say, the one stated, else OpenAI CLIP's
    QuickGELU; never silently (an open_clip GELU model in QuickGELU towers is ~1 % off)."""
    if found is not None and stated and found != stated:
        raise ValueError(f'{path}: its towers use {found}, not {stated} (config.model.act / --act)')
    if found is None:
        found = stated or 'quick_gelu'
        print(f'warning: {path} does not say which activation its towers use (no open_clip_config.json beside '
              f'it): taking {found}{"" if stated else " (OpenAI CLIP)"}; an open_clip GELU model (most LAION '
              f'ones) needs gelu (--act / config.model.act)', flush=True)
    return found


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


def _read(path, act=None):
    """(state dict in our names, model config, {kind, mean, std, run_config}) of a checkpoint file,
    its tower tensors checked against the config (on the meta device: no memory, no time);
    `act`: the activation the caller expects (_activation)."""
    obj = checkpoints.safe_load(path)
    try:
        kind = checkpoint_kind(obj)
    except ValueError as e:
        raise ValueError(f'{path}: {e}') from None
    info = dict(kind=kind, mean=images.IMAGENET_MEAN, std=images.IMAGENET_STD, run_config={})
    if kind == 'ours':
        sd, cfg, info['run_config'] = obj['model'], ml_collections.ConfigDict(obj['config']).model, obj['config']
        found = cfg.get('act', 'quick_gelu')
    else:
        sd = _strip(obj.get('model', obj.get('state_dict', obj)) if kind == 'reference' else obj, 'module.')
        found = 'quick_gelu'   # the DeCLIP reference's
        if kind == 'openai':
            sd = from_openai(sd)
            info['mean'], info['std'], found = _open_clip_config(path)
        sd = {k: v for k, v in sd.items() if not k.startswith('visual.fc.')}
        if 'logit_scale' in sd:
            sd['logit_scale'] = sd['logit_scale'].reshape(1)
        try:
            cfg = infer_model_config(sd)
        except KeyError as e:
            raise ValueError(f'{path}: no {e} (needed to infer the model)') from None
    cfg.act = _activation(path, found, act)
    with torch.device('meta'):
        _check_keys(path, sd, declip.build_model(cfg))
    return sd, cfg, info


def load_weights(path, act=None):
    """(state dict, model config) of our checkpoint, a DeCLIP reference .pth.tar or an OpenAI CLIP
    (or open_clip export) state dict, to start a new run from: the config is the file's (ours) or
    inferred from shapes (CLIP, declip False, when the file has no heads). Keys in our names:
    visual.* (OpenAI's), encode_text.* and logit_scale [1], always; projector.*, predictor.*,
    text_label_predictor.* only where the file has them (DeCLIP runs; not CLIP runs, OpenAI
    files), else they keep their fresh init under load_state_dict(strict=False); the reference's
    visual.fc.* dropped. OpenAI token rows land on DeCLIP's ids (sot/eot 49406/49407 ->
    49407/49408), the <|mask|> row 49406 is zeros, the bias-free text_projection becomes a
    Linear with zero bias. Every tower tensor is checked present and shaped as the config says
    (a RuntimeError naming the file). The towers' activation: _activation's."""
    return _read(path, act)[:2]


def load_model(path, config=None, act=None):
    """(model in eval mode, preprocess) for the files load_weights reads. `preprocess` maps a PIL
    image to the normalised [3, S, S] tensor the weights expect (ImageNet mean/std; OpenAI's for
    OpenAI weights, an export's own). The model carries kind, mean, std, run_config, bpe_path and
    tokenize(texts): int64 ids [len(texts), context length] in the model's own vocabulary."""
    sd, cfg, info = _read(path, act)
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


def checkpoint_file(path):
    """`path`, or for a run's workdir (or its checkpoints/ folder) the newest readable checkpoint
    in it: last.pt, else the newest kept copy."""
    path = Path(path)
    if not path.is_dir():
        return path
    folder = path / 'checkpoints' if (path / 'checkpoints').is_dir() else path
    found, _, unreadable = checkpoints.find_checkpoint(folder, warn=lambda message: print(f'warning: {message}'))
    if found is None:
        raise FileNotFoundError(f'{path}: no readable checkpoint in {folder}'
                                + ''.join(f'\n  {p}: {e}' for p, e in unreadable))
    return found
