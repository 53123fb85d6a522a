"""Config checks of the shell: a config whose model, loss or batch cannot train is refused at start,
in one line naming the keys and the rule, instead of failing deep inside the model."""

import contextlib

VISIONS = ('vit', 'resnet')


class ConfigError(ValueError):
    """A config the run cannot use: the command line prints its message alone, not a traceback."""


@contextlib.contextmanager
def config_errors():
    """Whatever a check of the config raises (ValueError, a missing file) becomes a ConfigError."""
    try:
        yield
    except (ValueError, OSError) as e:
        raise ConfigError(str(e)) from None


def _divides(errors, part, whole, part_key, whole_key):
    if part <= 0 or whole % part:
        errors.append(f'config.model.{whole_key} ({whole}) must be a multiple of config.model.{part_key} ({part})')


def _vision_errors(m):
    """What makes the image tower unbuildable: layers of the other tower type, heads that do not
    split the width, an image the patches or the ResNet's stride 32 do not tile."""
    errors = []
    if m.vision == 'vit':
        if not isinstance(m.vision_layers, int):
            errors.append(f"config.model.vision_layers: a ViT takes one block count, got {m.vision_layers!r} "
                          f"(a ResNet's four stage depths? then config.model.vision='resnet')")
        _divides(errors, m.patch_size, m.image_size, 'patch_size', 'image_size')
        _divides(errors, m.vision_heads, m.vision_width, 'vision_heads', 'vision_width')
    else:
        if isinstance(m.vision_layers, int) or len(tuple(m.vision_layers)) != 4:
            errors.append(f"config.model.vision_layers: a ResNet takes four stage depths, got {m.vision_layers!r} "
                          f"(a ViT's block count? then config.model.vision='vit')")
        if m.image_size % 32:
            errors.append(f'config.model.image_size ({m.image_size}) must be a multiple of 32 (the ResNet\'s stride)')
        if m.vision_heads <= 0 or (m.vision_width * 32) % m.vision_heads:
            errors.append(f'config.model.vision_width x 32 ({m.vision_width * 32}, the attention pool\'s width) must '
                          f'be a multiple of config.model.vision_heads ({m.vision_heads})')
    return errors


def check_model(cfg):
    """Refuse a config that cannot train: every error found, one line each (a ValueError)."""
    m, errors = cfg.model, []
    if m.vision not in VISIONS:
        raise ValueError(f'config.model.vision: one of {", ".join(VISIONS)}, got {m.vision!r}')
    errors += _vision_errors(m)
    _divides(errors, m.text_heads, m.text_width, 'text_heads', 'text_width')
    weights = {k: cfg.loss[k] for k in ('clip', 'simsiam', 'mlm', 'nn')}
    if not any(weights.values()):
        errors.append('config.loss: clip, simsiam, mlm and nn are all 0: nothing to train')
    extra = [k for k in ('simsiam', 'mlm', 'nn') if weights[k]]
    if extra and not m.declip:
        errors.append(f'config.loss.{"/".join(extra)} > 0 needs config.model.declip=True (the CLIP model has no '
                      f'SimSiam, MLM or NN parts)')
    if m.declip and cfg.data.batch_size < 2:
        errors.append(f'config.data.batch_size ({cfg.data.batch_size}): DeCLIP\'s SimSiam heads normalise over each '
                      f'device\'s batch (BatchNorm), which needs at least 2 samples')
    if errors:
        raise ValueError('\n'.join(errors))
