"""Images: host decode and RandomResizedCrop/flip/resize to uint8 (loader workers), batched
device-side colour jitter / grayscale / blur / normalisation (device JPEG decode: jpeg.py)."""
import functools
import math
import warnings

import torch
import torch.nn.functional as F
from einops import rearrange

# ----------------------------------------------------------------------------------------------
# Images, CPU part: decode, RandomResizedCrop, flip, resize -> uint8 (loader workers)
# ----------------------------------------------------------------------------------------------

class DecodeError(ValueError):
    """An image file whose pixels cannot be decoded (cut short or corrupt past its header)."""


def open_bytes(raw):
    """A PIL image of an image file's bytes, header read; its pixels are decoded by to_rgb."""
    import io

    from PIL import Image
    return Image.open(io.BytesIO(raw))


def to_rgb(img):
    """Decode to RGB from every mode Pillow opens (a truncated file raises DecodeError). 16-bit data (I;16,
    I;16L, I;16B, I;16N, and 'I', whose files are 16-bit PNG/TIFF, clipped to 0..65535) is scaled
    to 8 bits (v * 255 / 65535, rounded) rather than clipped; float ('F') images in [0, 1] are
    scaled by 255, others clipped to 0..255 (NaN: 0). Alpha is dropped as convert('RGB') drops it
    (palette transparency and premultiplied 'La' included)."""
    from PIL import Image
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise DecodeError(str(e)) from e
    if img.mode.startswith('I') or img.mode == 'F':
        img = _gray8(img)
    elif img.mode == 'La':
        gray, alpha = img.split()
        img = Image.merge('RGBa', (gray, gray, gray, alpha))
    elif img.mode in ('P', 'PA') and 'transparency' in img.info or img.mode == 'PA':
        img = img.convert('RGBA')
    return img.convert('RGB') if img.mode != 'RGB' else img


def _gray8(img):
    """An 8-bit 'L' image of a 16/32-bit integer or float one (to_rgb's scaling)."""
    import numpy as np
    from PIL import Image
    a = np.asarray(img)
    if img.mode == 'F':
        a = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.min() >= 0 and a.max() <= 1:
            a = a * 255
        out = np.clip(np.rint(a), 0, 255)
    else:
        a = np.clip(a.astype(np.int64), 0, 65535)
        out = (a * 255 + 32767) // 65535
    return Image.fromarray(out.astype(np.uint8))


def rrc_params(width, height, rng, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision RandomResizedCrop.get_params: 10 tries, then the centre fallback.
    Returns (left, top, w, h)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _to_chw(img):
    """An RGB PIL image as its own contiguous uint8 [3, H, W] tensor (one copy of _pixels' view)."""
    return _pixels(img)[0].contiguous()


# data.augmentation -> whether its views are MoCo v2's: host crops flip (p 0.5) and the device runs
# colour jitter, grayscale and blur (DeCLIP). The CLIP baseline's is the reference's STANDARD_SLIP
# (its CLIP configs' transform): RandomResizedCrop(scale 0.5-1) only; the device only normalises.
AUGMENTATIONS = {'moco_v2': True, 'standard_slip': False}
# former names: the reference's STANDARD_CLIP is another transform (RandomCropMinSize)
RENAMED = {'standard_clip': 'standard_slip'}


def augmentation_name(name):
    """data.augmentation's current name: a former one is accepted with a warning; an unknown one is an error."""
    if name in RENAMED:
        warnings.warn(f'config.data.augmentation={name!r} is now called {RENAMED[name]!r} '
                      f'(the reference\'s STANDARD_SLIP; its STANDARD_CLIP is another transform)', stacklevel=2)
        name = RENAMED[name]
    if name not in AUGMENTATIONS:
        raise ValueError(f'config.data.augmentation: one of {", ".join(AUGMENTATIONS)}, got {name!r}')
    return name


def moco_views(augmentation):
    """Whether data.augmentation `augmentation` makes MoCo v2 views (host flip, device colour ops)."""
    return AUGMENTATIONS[augmentation_name(augmentation)]


def view_boxes(width, height, rng, *, views=2, scale=(0.2, 1.0), flip=True):
    """RandomResizedCrop boxes (left, top, w, h) and horizontal flips (p 0.5) of `views` views;
    without `flip` (the CLIP baseline's crops) no flip is drawn and none is made."""
    boxes = [rrc_params(width, height, rng, scale) for _ in range(views)]
    return boxes, [flip and rng.random() < 0.5 for _ in range(views)]


def resize_crop(pixels, box, size, flip):
    """One view of uint8 `pixels` [1, 3, H, W]: the box (x0, y0, x1, y1) resized to size x size
    with antialiased bilinear filtering (Pillow's BILINEAR up to rounding), then flipped."""
    x0, y0, x1, y1 = box
    crop = pixels[:, :, y0:y1, x0:x1]
    view = (_resize_uint8 if crop.is_cpu else _resize_float)(crop, size)[0]
    return view.flip(-1) if flip else view


def _resize_uint8(crop, size):
    """torch's CPU uint8 kernel (it wants channels-last)."""
    crop = crop.contiguous(memory_format=torch.channels_last)
    return F.interpolate(crop, size=(size, size), mode='bilinear', antialias=True)


def _resize_float(crop, size):
    """The same filter in float, rounded back to uint8 (accelerators)."""
    view = F.interpolate(crop.float(), size=(size, size), mode='bilinear', antialias=True)
    return view.round_().clamp_(0, 255).to(torch.uint8)


def train_views(img, *, size, rng, views=2, scale=(0.2, 1.0), flip=True):
    """Independent RandomResizedCrop(size, scale) + horizontal flip (p 0.5, if `flip`) views of
    one image, uint8 [views, 3, size, size]. Crops are drawn on the full-size geometry; JPEGs are
    then decoded at the largest DCT reduction that keeps every crop >= size (draft mode). Resizing by
    torch's uint8 kernel is Pillow's BILINEAR resize (torchvision's crop-then-resize) up to
    rounding (1 level, ~0.1 % of the values for photos), in half the time."""
    width, height = img.size
    boxes, flips = view_boxes(width, height, rng, views=views, scale=scale, flip=flip)
    if img.format == 'JPEG':
        factor = min(min(w, h) for _, _, w, h in boxes) / size
        if factor >= 2:
            img.draft('RGB', (int(width / factor) + 1, int(height / factor) + 1))
    img = to_rgb(img)
    sx, sy = img.width / width, img.height / height
    pixels = _pixels(img)
    out = torch.empty(views, 3, size, size, dtype=torch.uint8)
    for v, ((left, top, w, h), flipped) in enumerate(zip(boxes, flips)):
        box = round(left * sx), round(top * sy), round((left + w) * sx), round((top + h) * sy)
        out[v] = resize_crop(pixels, box, size, flipped)
    return out


def _pixels(img):
    """An RGB PIL image as a uint8 [1, 3, H, W] (channels-last) view of one copy of its pixels."""
    with warnings.catch_warnings():  # read-only bytes: nothing writes to them
        warnings.simplefilter('ignore', UserWarning)
        pixels = torch.frombuffer(img.tobytes(), dtype=torch.uint8)
    return rearrange(pixels, '(h w c) -> 1 c h w', h=img.height, w=img.width)


def eval_resize(size):
    """The shorter side before the centre crop: 256 for 224, the ImageNet convention, scaled."""
    return round(size * 256 / 224)


def eval_view(img, *, size=224):
    """Resize the shorter side to eval_resize(size) (bilinear), centre-crop `size`: uint8 [3, size, size]."""
    from PIL import Image
    resize = eval_resize(size)
    img = to_rgb(img)
    w, h = img.size
    if w <= h:
        nw, nh = resize, int(resize * h / w)
    else:
        nw, nh = int(resize * w / h), resize
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return _to_chw(img.crop((left, top, left + size, top + size)))


# ----------------------------------------------------------------------------------------------
# Images, device part: batched colour jitter / grayscale / blur / normalise
# ----------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _gray(x):
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _per_sample(v, x):
    return v.to(x.dtype).view(-1, 1, 1, 1)


def adjust_brightness(x, factor):
    return (x * _per_sample(factor, x)).clamp(0, 1)


def adjust_contrast(x, factor):
    """Blend with the mean of the grayscale image (PIL ImageEnhance.Contrast)."""
    f = _per_sample(factor, x)
    return (x * f + _gray(x).mean(dim=(1, 2, 3), keepdim=True) * (1 - f)).clamp(0, 1)


def adjust_saturation(x, factor):
    f = _per_sample(factor, x)
    return (x * f + _gray(x) * (1 - f)).clamp(0, 1)


def adjust_hue(x, shift):
    """Rotate hue by `shift` (fraction of the circle) as PIL does it for torchvision's adjust_hue:
    RGB -> 8-bit HSV (H and S truncated, a 255-step hue circle), H += trunc(255*shift) with uint8
    wrap-around, HSV -> RGB with rounding. float32 and bool operations only (Ascend runs int64
    arithmetic on its AI CPU, and has no float64); equal to Pillow on every 8-bit colour."""
    q = torch.round(x.float() * 255)
    hq, sq, v = _hsv8(q)
    step = torch.trunc(_per_sample(shift, q)[:, 0] * 255)
    return (_rgb8(torch.remainder(hq + step, 256), sq, v) / 255).to(x.dtype)


def _hsv8(q):
    """Pillow's 8-bit (H, S, V) of integer-valued float RGB [N, 3, H, W] (rgb2hsv_row). Pillow's
    hue is bc - gc, 2 + rc - bc or 4 + gc - rc (rc = (max - r) / delta in float32; the 2 + ... in
    double, stored as float); the minimum channel's ratio is 1, so each case is one float32
    operation on the middle channel's ratio c, rounded once as Pillow rounds it. Then
    fmod(h / 6 + 1, 1) and truncation of x * 255: exact in float32 here (the tests check every
    colour class against Pillow). A gray pixel gets S = 0, which makes its H irrelevant."""
    maxc, minc = q.amax(dim=1), q.amin(dim=1)
    delta = maxc - minc
    r, g, b = q.unbind(1)
    c = (maxc - (r + g + b - maxc - minc)) / delta.clamp_min(1)
    h = torch.where(r == maxc, torch.where(g < b, c - 1, 1 - c),
                    torch.where(g == maxc, torch.where(r == minc, 3 - c, 1 + c),
                                torch.where(g == minc, 5 - c, 3 + c)))
    hue = h / 6 + (h < 0).float()
    return torch.floor(hue * 255), torch.floor(delta / maxc.clamp_min(1) * 255), maxc


def _rgb8(hq, sq, v):
    """Pillow's hsv2rgb of 8-bit (H, S, V) as integer-valued float RGB [N, 3, H, W]."""
    i = torch.floor(hq * 6.0 / 255.0)
    f = hq * 6.0 / 255.0 - i
    fs = sq / 255.0
    p = torch.floor(v * (1.0 - fs) + 0.5)
    qq = torch.floor(v * (1.0 - fs * f) + 0.5)
    t = torch.floor(v * (1.0 - fs * (1.0 - f)) + 0.5)
    # the six hue sectors pick (v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)
    i = i.remainder(6)
    red = torch.where((i == 0) | (i == 5), v, torch.where(i == 1, qq, torch.where(i == 4, t, p)))
    green = torch.where((i == 1) | (i == 2), v, torch.where(i == 0, t, torch.where(i == 3, qq, p)))
    blue = torch.where((i == 3) | (i == 4), v, torch.where(i == 2, t, torch.where(i == 5, qq, p)))
    return torch.where((sq == 0).unsqueeze(1), v.unsqueeze(1), torch.stack([red, green, blue], dim=1))


def to_grayscale(x, _param=None):
    """Luma in all three channels (PIL convert('L') then 'RGB'); `_param` keeps the op signature."""
    return _gray(x).expand_as(x)


def _box_radius(sigma, passes=3):
    """Pillow's extended-box radius whose `passes` box blurs have variance sigma^2."""
    sigma2 = sigma * sigma / passes
    big_l = torch.sqrt(12.0 * sigma2 + 1.0)
    l = torch.floor((big_l - 1.0) / 2.0)
    a = (2 * l + 1) * (l * (l + 1) - 3 * sigma2) / (6 * (sigma2 - (l + 1) * (l + 1)))
    return l + a


def gaussian_blur(x, sigma, max_sigma=2.0):
    """PIL ImageFilter.GaussianBlur(radius=sigma) semantics: three extended box blurs along rows,
    then three along columns, edges extended, 8-bit rounding after each pass; per-sample
    sigma <= max_sigma.
    The kernel width comes from max_sigma, so nothing is read back from the device."""
    n, c, h, w = x.shape
    radius = _box_radius(sigma.float()).to(x.dtype)  # float32: no float64 kernel on the device
    taps = int(_box_radius(torch.tensor(float(max_sigma)))) + 1
    offsets = torch.arange(-taps, taps + 1, device=x.device, dtype=x.dtype)
    r = radius.view(-1, 1)
    inner = torch.floor(r)
    weight = torch.where(offsets.abs() <= inner, torch.ones_like(offsets * r),
                         torch.where(offsets.abs() == inner + 1, r - inner, torch.zeros_like(offsets * r)))
    weight = weight / (2 * r + 1)
    kernel = weight.repeat_interleave(c, dim=0)  # [n*c, 2*taps+1]
    y = x.reshape(1, n * c, h, w)
    for dim in (3, 2):
        k = kernel.view(n * c, 1, 1, -1) if dim == 3 else kernel.view(n * c, 1, -1, 1)
        pad = (taps, taps, 0, 0) if dim == 3 else (0, 0, taps, taps)
        for _ in range(3):  # PIL rounds to 8 bits after every pass
            y = F.conv2d(F.pad(y, pad, mode='replicate'), k, groups=n * c)
            y = torch.floor(y * 255 + 0.5) / 255
    return y.view(n, c, h, w)


def to_device(t, device):
    """An asynchronous host-to-device copy: from pinned memory (pinned here when the tensor is not,
    e.g. one built in the step), since a non_blocking copy of unpageable memory waits for the
    device on NPU."""
    if device.type != 'cpu' and t.device.type == 'cpu' and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _plan_on_device(plan, device):
    """[(op, host mask, host per-sample parameter)] -> [(op, count, indices, parameters)] with
    the indices of the flagged samples and their parameters on `device`: one host-to-device
    copy for all ops (pinned, asynchronous), and every count known on the host."""
    index = [mask.nonzero().squeeze(1) for _, mask, _ in plan]
    flat_index = torch.cat(index)
    flat_param = torch.cat([param[i].float() for (_, _, param), i in zip(plan, index)])
    flat_index, flat_param = to_device(flat_index, device), to_device(flat_param, device)
    counts = [len(i) for i in index]
    return [(op, n, i, f) for (op, _, _), n, i, f in zip(plan, counts, flat_index.split(counts), flat_param.split(counts))]


def _whole_batch(plan, device):
    """The static-shape form of _plan_on_device: every op runs on the whole batch and keeps its
    result where the sample's flag is set (torch.where), so no shape depends on the draw."""
    masks = torch.stack([mask for _, mask, _ in plan])
    params = torch.stack([param.float() for _, _, param in plan])
    masks, params = to_device(masks, device), to_device(params, device)
    return [(op, m, f) for (op, _, _), m, f in zip(plan, masks, params)]


def device_augment(images, *, generator, jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.4,
                   hue=0.1, gray_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0), normalize=True, static=False):
    """MoCo v2 colour ops on a uint8 batch [N, 3, H, W] on its own device: with p jitter_p
    ColorJitter (the four ops in a random order per sample), grayscale with p gray_p, PIL-style
    Gaussian blur with p blur_p; then ImageNet normalisation. The per-sample choices and
    parameters are drawn on the host from the CPU `generator`, so each op runs only on the
    samples that get it and nothing is read back from the device; `static` runs every op on
    every sample instead and selects (the same result, in shapes that never change)."""
    n = images.shape[0]

    def u(lo, hi):
        return torch.rand(n, generator=generator) * (hi - lo) + lo

    jitter = torch.rand(n, generator=generator) < jitter_p
    factors = [u(1 - brightness, 1 + brightness), u(1 - contrast, 1 + contrast),
               u(1 - saturation, 1 + saturation), u(-hue, hue)]
    order = torch.rand(n, 4, generator=generator).argsort(dim=1)
    gray = torch.rand(n, generator=generator) < gray_p
    blur = torch.rand(n, generator=generator) < blur_p
    sigma = u(*blur_sigma)
    ops = [adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue]
    plan = [(ops[k], jitter & (order[:, slot] == k), factors[k]) for slot in range(4) for k in range(4)]
    plan += [(to_grayscale, gray, sigma),
             (lambda y, s: gaussian_blur(y, s, max_sigma=blur_sigma[1]), blur, sigma)]
    x = images.float() / 255
    if static:
        for op, mask, param in _whole_batch(plan, x.device):
            x = torch.where(mask.view(-1, 1, 1, 1), op(x, param), x)
        return normalize_images(x) if normalize else x
    for op, count, index, param in _plan_on_device(plan, x.device):
        if count:
            x.index_copy_(0, index, op(x.index_select(0, index), param))
    return normalize_images(x) if normalize else x


def _stats(x, mean, std):
    return _channel_constants(tuple(mean), tuple(std), x.device, x.dtype)


@functools.lru_cache(maxsize=16)
def _channel_constants(mean, std, device, dtype):
    """Copied to the device once: a host-to-device copy in every step would make the host wait for
    the device's queue each time (the one synchronisation CUDA's sync debug mode found in a step)."""
    return tuple(torch.tensor(v, device=device, dtype=dtype).view(1, 3, 1, 1) for v in (mean, std))


def normalize_images(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Float [0, 1] (or uint8) images [N, 3, H, W] -> normalised (ImageNet mean/std by default)."""
    if x.dtype == torch.uint8:
        x = x.float() / 255
    mean, std = _stats(x, mean, std)
    return (x - mean) / std


def denormalize_images(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The inverse of normalize_images, clamped to [0, 1] (for looking at views)."""
    mean, std = _stats(x, mean, std)
    return (x * std + mean).clamp(0, 1)

