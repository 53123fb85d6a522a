"""Optional device JPEG decode (data.decode='device'): loader workers send a JPEG's bytes with the
crop boxes and flips of its views; before the training step the batch is decoded on the device
(nvjpeg on CUDA) and the views cut there (`decoded`), so the step sees views as from host decode.
Files the device cannot take are decoded on the host as usual."""
import torch

from guard import BAD_KINDS, BadSample, GuardedBuilder, open_image
from images import DecodeError, _pixels, resize_crop, to_rgb, view_boxes


def device_decodable(raw, img):
    """YCbCr or grayscale JPEGs that end with their end-of-image marker go to the device; others
    (CMYK, truncated files, trailing bytes, other formats) are decoded here, where a bad file
    becomes a bad sample that is replaced like any other."""
    return img.format == 'JPEG' and img.mode in ('RGB', 'L') and raw[-2:] == b'\xff\xd9'


def jpeg_sample(raw, width, height, rng, *, views=2, scale=(0.2, 1.0), flip=True):
    """A JPEG's bytes with the crop boxes (x0, y0, x1, y1) and flips its views will get on the
    device; the random draws are the host path's (train_views), so both modes crop alike."""
    boxes, flips = view_boxes(width, height, rng, views=views, scale=scale, flip=flip)
    return {'jpeg': torch.frombuffer(bytearray(raw), dtype=torch.uint8),
            'boxes': torch.tensor([(x, y, x + w, y + h) for x, y, w, h in boxes]),
            'flips': torch.tensor(flips)}


class DeviceBuilder(GuardedBuilder):
    """The loader's sample builder with data.decode='device': a JPEG the device can take is sent
    as its bytes and view boxes, any other image is decoded here."""

    def image_views(self, raw, rng):
        img = self.open(raw)
        if device_decodable(raw, img):
            return jpeg_sample(raw, img.width, img.height, rng, **self.crops())
        return self.host_views(img, rng)


def collate_jpeg(samples):
    """The device-decode part of a batch: all JPEG bytes in one tensor with per-sample sizes
    (0 for samples decoded on the host), boxes, flips and the indices of host-decoded samples."""
    views = next(s['boxes'].shape[0] for s in samples if 'jpeg' in s)
    return {'jpeg': torch.cat([s['jpeg'] for s in samples if 'jpeg' in s]),
            'jpeg_sizes': torch.tensor([s['jpeg'].numel() if 'jpeg' in s else 0 for s in samples]),
            'boxes': torch.stack([s.get('boxes', torch.zeros(views, 4, dtype=torch.long)) for s in samples]),
            'flips': torch.stack([s.get('flips', torch.zeros(views, dtype=torch.bool)) for s in samples]),
            'host': torch.tensor([i for i, s in enumerate(samples) if 'jpeg' not in s], dtype=torch.long)}


def nvjpeg_decoder(device):
    """torchvision's batched decode_jpeg on `device` (nvjpeg on CUDA); imported only when used."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError as e:
        raise RuntimeError("data.decode='device' needs torchvision (with its image extension)") from e
    return lambda blobs: decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)


def _pillow_decode(blob, device):
    """The host fallback for one JPEG the device decoder refused: uint8 [3, H, W] or None."""
    try:
        img = to_rgb(open_image(bytes(blob.numpy()), 1 << 62))
    except (BadSample, DecodeError):
        return None
    return _pixels(img)[0].to(device)


def decode_views(batch, *, size, device, decode=None):
    """(uint8 views [B, V, 3, size, size] on `device`, number of undecodable images) of a
    device-decode batch. JPEGs are decoded in one call of `decode` (default nvjpeg_decoder); when
    it fails, each image is retried alone and then with Pillow. Views are resize_crop's of the
    sent boxes; host-decoded samples are copied in; an image nothing decodes takes the views of
    the batch's first good sample (and is counted, like any bad sample)."""
    decode = decode or nvjpeg_decoder(device)
    boxes, flips, sizes = batch['boxes'].tolist(), batch['flips'].tolist(), batch['jpeg_sizes'].tolist()
    out = torch.empty(len(sizes), len(boxes[0]), 3, size, size, dtype=torch.uint8, device=device)
    if 'images' in batch:
        out[batch['host'].to(device)] = batch['images'].to(device, non_blocking=True)
    index = [i for i, n in enumerate(sizes) if n]
    blobs = list(torch.split(batch['jpeg'], [sizes[i] for i in index]))
    try:
        images = decode(blobs)
    except RuntimeError:
        images = []
        for blob in blobs:
            try:
                images.append(decode([blob])[0])
            except RuntimeError:
                images.append(_pillow_decode(blob, device))
    failed = []
    for i, img in zip(index, images):
        if img is None:
            failed.append(i)
            continue
        for v, (box, flip) in enumerate(zip(boxes[i], flips[i])):
            out[i, v] = resize_crop(img[None], box, size, flip)
    if failed:
        good = next((i for i in range(len(sizes)) if i not in failed), None)
        if good is None:
            raise RuntimeError(f'no image of a {len(sizes)}-sample batch could be decoded')
        out[failed] = out[good].clone()
    return out, len(failed)


JPEG_KEYS = ('jpeg', 'jpeg_sizes', 'boxes', 'flips', 'host')


def decoded(batch, *, size, device):
    """`batch` with its JPEGs decoded into uint8 'images' [B, V, 3, size, size] on `device`
    (decode_views; the host-decoded samples copied in), an image nothing could decode counted in
    'bad' as truncated; a batch without JPEGs as it is."""
    if 'jpeg' not in batch:
        return batch
    views, failed = decode_views(batch, size=size, device=device)
    bad = batch['bad'].clone() if 'bad' in batch else torch.zeros(len(BAD_KINDS), dtype=torch.long)
    bad[BAD_KINDS.index('truncated')] += failed
    return {**{k: v for k, v in batch.items() if k not in JPEG_KEYS}, 'images': views, 'bad': bad}
