"""Every image mode Pillow opens converts to RGB values (16-bit scaled, not clipped), also as a training sample."""
import io

import numpy as np
import pytest
from PIL import Image

import images
import loader
from helpers import data_config, write_meta


SIXTEEN = np.array([[0, 257, 384, 32896, 65535]], dtype=np.uint16)
SIXTEEN_8 = [0, 1, 1, 128, 255]


def mode_cases():
    """(name, image, expected RGB rows of its first pixel row), several through a file round trip."""
    def saved(img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return Image.open(io.BytesIO(buf.getvalue()))

    def gray(values):
        return [(v, v, v) for v in values]
    pal = Image.new('P', (2, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pa = Image.new('PA', (2, 1))
    pa.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pa.putpixel((1, 0), (1, 0))
    return [
        ('1', saved(Image.fromarray(np.array([[0, 1]], dtype=bool)), 'PNG'), gray([0, 255])),
        ('L', saved(Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8)), 'PNG'), gray([0, 77, 255])),
        ('LA', saved(Image.new('LA', (1, 1), (77, 10)), 'PNG'), gray([77])),
        ('La', Image.new('La', (1, 1), (100, 128)), gray([199])),
        ('P', saved(pal, 'PNG', transparency=0), [(255, 0, 0), (0, 255, 0)]),
        ('PA', pa, [(255, 0, 0), (0, 255, 0)]),
        ('RGBA', saved(Image.new('RGBA', (1, 1), (10, 20, 30, 0)), 'PNG'), [(10, 20, 30)]),
        ('RGBa', Image.new('RGBa', (1, 1), (100, 50, 20, 128)), [(199, 99, 39)]),
        ('RGBX', Image.new('RGBX', (1, 1), (10, 20, 30, 0)), [(10, 20, 30)]),
        ('CMYK', saved(Image.new('CMYK', (1, 1), (10, 200, 30, 0)), 'TIFF'), [(245, 55, 225)]),
        ('YCbCr', saved(Image.new('YCbCr', (1, 1), (76, 85, 255)), 'TIFF'), [(254, 0, 0)]),
        ('HSV', Image.new('HSV', (1, 1), (0, 255, 255)), [(255, 0, 0)]),
        ('I;16', saved(Image.fromarray(SIXTEEN), 'PNG'), gray(SIXTEEN_8)),
        ('I;16L', Image.frombytes('I;16L', (5, 1), SIXTEEN.astype('<u2').tobytes()), gray(SIXTEEN_8)),
        ('I;16B', saved(Image.frombytes('I;16B', (5, 1), SIXTEEN.astype('>u2').tobytes()), 'TIFF'), gray(SIXTEEN_8)),
        ('I;16N', Image.frombytes('I;16N', (5, 1), SIXTEEN.tobytes()), gray(SIXTEEN_8)),
        ('I', saved(Image.fromarray(np.array([[0, 257, 32896, 65535, -5, 70000]], dtype=np.int32)), 'TIFF'),
         gray([0, 1, 128, 255, 0, 255])),
        ('F', saved(Image.fromarray(np.array([[0.0, 0.5, 1.0, 0.25]], dtype=np.float32)), 'TIFF'),
         gray([0, 128, 255, 64])),
        ('F', Image.fromarray(np.array([[0.0, 100.4, 300.0, -3.0, np.nan]], dtype=np.float32)),
         gray([0, 100, 255, 0, 0])),
    ]


@pytest.mark.parametrize('case', range(len(mode_cases())), ids=[c[0] for c in mode_cases()])
def test_every_pillow_mode_converts_to_rgb_values(case):
    mode, img, expected = mode_cases()[case]
    assert img.mode == mode
    rgb = images.to_rgb(img)
    assert rgb.mode == 'RGB' and [rgb.getpixel((x, 0)) for x in range(len(expected))] == expected


def test_lab_converts_by_lightness():
    lab = Image.new('LAB', (2, 1))
    lab.putpixel((0, 0), (255, 128, 128))  # a and b are stored offset by 128
    lab.putpixel((1, 0), (0, 128, 128))
    rgb = images.to_rgb(lab)
    assert min(rgb.getpixel((0, 0))) >= 250 and max(rgb.getpixel((1, 0))) <= 5


def test_sixteen_bit_big_endian_tiff_is_a_good_sample(tmp_path):
    ramp = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype('>u2')
    Image.frombytes('I;16B', (64, 48), ramp.tobytes()).save(tmp_path / 'scan.tif')
    write_meta(tmp_path / 'meta.jsonl', [{'filename': 'scan.tif', 'caption': 'a scan'}])
    sample = loader.train_dataset(data_config(train_root=str(tmp_path), train_meta=str(tmp_path / 'meta.jsonl')))[(0, 0)]
    assert sample['bad'].sum() == 0 and sample['images'].float().std() > 10   # a ramp, not a blank
