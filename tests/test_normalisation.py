"""Images are normalised with ImageNet's mean and std, on the host and in the device augmentation."""
import torch

import images


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
