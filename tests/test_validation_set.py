"""The evaluation set: bad images skipped and counted alike on every rank, meta problems named, all checked first."""
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import data
import evaluate
import guard
from helpers import run_distributed, write_jpeg, write_meta


COLOURS = {'red': (220, 20, 20), 'green': (20, 220, 20), 'blue': (20, 20, 220)}


class ColourModel(torch.nn.Module):
    """Image embedding: the mean colour; text embedding: the colour named by the first token."""

    def __init__(self):
        super().__init__()
        self.cfg = SimpleNamespace(image_size=32, context_length=16)
        self.mean, self.std = (0, 0, 0), (1, 1, 1)
        tok = data.get_tokenizer()
        self.ids = {tok.encode(name)[0]: k for k, name in enumerate(COLOURS)}

    def encode_image(self, x):
        return x.float().mean(dim=(2, 3))

    def encode_text(self, tokens):
        return torch.nn.functional.one_hot(torch.tensor([self.ids[int(t)] for t in tokens[:, 1]]), 3).float()


def colour_val_set(folder, bad=()):
    """Six good images (two per colour) and the bad filenames given, interleaved; the meta path."""
    folder.mkdir(exist_ok=True)
    recs = []
    for i in range(6):
        name = list(COLOURS)[i % 3]
        write_jpeg(folder / f'{i}.jpg', size=(40, 40), color=COLOURS[name], seed=i)
        recs.append({'filename': f'{i}.jpg', 'label': i % 3, 'label_name': name})
        if i < len(bad):
            recs.append({'filename': bad[i], 'label': 0, 'label_name': 'red'})
    return write_meta(folder / 'val.jsonl', recs)


def run_eval(folder, meta, *, workers=0, rank=0, world=1):
    return evaluate.evaluate(ColourModel(), val_root=str(folder), val_meta=str(meta), task='zeroshot', prompts='cc',
                             class_names=None, batch=3, workers=workers, device=torch.device('cpu'),
                             autocast=torch.autocast('cpu', enabled=False), rank=rank, world=world)


@pytest.mark.parametrize('workers', [0, 2])
def test_unreadable_validation_images_are_skipped_and_counted(tmp_path, workers, capfd):
    folder = tmp_path / 'val'
    folder.mkdir()
    (folder / 'text.jpg').write_text('not an image')
    os.mkfifo(folder / 'fifo.jpg')
    write_jpeg(tmp_path / 'outside.jpg')
    meta = colour_val_set(folder, bad=['missing.jpg', 'text.jpg', 'fifo.jpg', '../outside.jpg'])
    m = run_eval(folder, meta, workers=workers)
    assert m['images'] == 6 and m['zeroshot_top1'] == 100.0 and m['images_skipped'] == 4
    assert m['skipped'] == {'missing': 1, 'not_image': 1, 'not_regular': 1, 'outside_root': 1}
    out = capfd.readouterr().out
    assert 'val.jsonl:2' in out and 'metrics are over the images scored' in out


def test_every_validation_image_bad_is_a_clear_error(tmp_path):
    folder = tmp_path / 'val'
    folder.mkdir()
    meta = write_meta(folder / 'val.jsonl', [{'filename': f'{i}.jpg', 'label': 0, 'label_name': 'red'}
                                             for i in range(3)])
    with pytest.raises(guard.DataError, match=r"none of the 3 evaluation images could be scored.*'missing': 3"):
        run_eval(folder, meta)


def test_one_int64_all_reduce_carries_the_skips_and_a_rank_with_none_left_takes_part(tmp_path, monkeypatch):
    """This rank's share is all bad; the other rank (simulated in the reduce) scored 2 images."""
    folder = tmp_path / 'val'
    folder.mkdir()
    meta = write_meta(folder / 'val.jsonl', [{'filename': 'gone.jpg', 'label': 0, 'label_name': 'red'}] * 2)
    seen = []

    def other_rank(t):
        seen.append(t.dtype)
        return t + torch.tensor([1, 2, 2] + [0] * len(guard.BAD_KINDS))
    monkeypatch.setattr(evaluate, '_all_reduce', other_rank)
    m = run_eval(folder, meta)
    assert seen == [torch.int64]
    assert (m['zeroshot_top1'], m['zeroshot_top5'], m['images'], m['skipped']) == (50.0, 100.0, 2, {'missing': 2})


def _two_rank_eval(rank, world, folder, path):
    folder = Path(folder)
    out = {'mixed': run_eval(folder, folder / 'val.jsonl', rank=rank, world=world)}
    try:
        run_eval(folder, folder / 'bad.jsonl', rank=rank, world=world)
    except guard.DataError as e:
        out['error'] = str(e)
    torch.save(out, f'{path}.{rank}')


def test_two_ranks_agree_when_one_rank_has_only_bad_images(tmp_path):
    folder = tmp_path / 'val'
    folder.mkdir()
    recs = []
    for i in range(3):  # rank 0 takes the even lines: all missing
        recs.append({'filename': f'gone{i}.jpg', 'label': 1, 'label_name': 'green'})
        write_jpeg(folder / f'{i}.jpg', size=(40, 40), color=COLOURS['green'], seed=i)
        recs.append({'filename': f'{i}.jpg', 'label': 1, 'label_name': 'green'})
    write_meta(folder / 'val.jsonl', recs)
    write_meta(folder / 'bad.jsonl', [r for r in recs if r['filename'].startswith('gone')])
    run_distributed(_two_rank_eval, 2, str(folder), str(tmp_path / 'out'))
    got = [torch.load(tmp_path / f'out.{r}') for r in range(2)]
    assert got[0]['mixed'] == got[1]['mixed']
    assert got[0]['mixed']['images'] == 3 and got[0]['mixed']['skipped'] == {'missing': 3}
    assert 'none of the 3 evaluation images' in got[0]['error'] and got[0]['error'] == got[1]['error']


RED = '{"filename": "0.jpg", "label": 0, "label_name": "red"}'


@pytest.mark.parametrize('lines, class_names, message', [
    ([RED, '{"filename": '], None, r'val\.jsonl:2: .*Expecting'),
    ([RED.replace('0,', '"0",')], None, r'val\.jsonl:1: "label" must be a non-negative integer, got \'0\''),
    ([RED, '', '{"filename": "1.jpg", "label": 0, "label_name": "blue"}'], None,
     r"val\.jsonl:3: label 0 is named 'blue' here but 'red' on line 1"),
    ([RED, '{"filename": "1.jpg", "label": 5, "label_name": "x"}'], ['red', 'green', 'blue'],
     r'val\.jsonl:2: label 5 is not one of the 3 classes'),
    (['[1, 2]'], None, r'val\.jsonl:1: expected a JSON object, got list'),
    (['{"label": 0, "label_name": "red"}'], None, r'val\.jsonl:1: "filename" must be'),
    (['{"filename": "0.jpg"}'], None, r'val\.jsonl:1: no "label" and "label_name"'),
    ([RED, b'{"filename": "\xff"}'], None, r'val\.jsonl:2: .*utf-8'),
])
def test_validation_meta_problems_name_file_and_line(tmp_path, lines, class_names, message):
    meta = tmp_path / 'val.jsonl'
    meta.write_bytes(b'\n'.join(x if isinstance(x, bytes) else x.encode() for x in lines))
    with pytest.raises(ValueError, match=message):
        evaluate.evaluate(ColourModel(), val_root=str(tmp_path), val_meta=str(meta), task='zeroshot', prompts='cc',
                          class_names=class_names, batch=2, workers=0, device=torch.device('cpu'),
                          autocast=torch.autocast('cpu', enabled=False))


def test_validation_meta_with_bom_and_crlf_is_accepted(tmp_path):
    folder = tmp_path / 'val'
    meta = colour_val_set(folder)
    meta.write_bytes('\ufeff'.encode() + meta.read_text().replace('\n', '\r\n').encode() + b'  \r\n')
    m = run_eval(folder, meta)
    assert m['images'] == 6 and m['zeroshot_top1'] == 100.0 and m['skipped'] == {}


def test_evaluation_set_is_checked_before_any_image_is_scored(tmp_path):
    """The meta lines and the image folder: a folder that holds none of the first images, a
    folder that does not exist, filenames that leave the folder, each an error naming them."""
    folder = tmp_path / 'val'
    meta = colour_val_set(folder)
    evaluate.check_eval_set(str(folder), str(meta))
    (tmp_path / 'elsewhere').mkdir()
    with pytest.raises(ValueError, match=rf"none of the first 6 images of {meta} is a file under "
                                         rf"'{tmp_path / 'elsewhere'}' \(no file {tmp_path / 'elsewhere'}/"):
        evaluate.check_eval_set(str(tmp_path / 'elsewhere'), str(meta))
    with pytest.raises(ValueError, match=rf'image folder not found: {tmp_path / "gone"}'):
        evaluate.check_eval_set(str(tmp_path / 'gone'), str(meta))
    escaping = write_meta(tmp_path / 'up.jsonl', [{'filename': f'../val/{i}.jpg', 'label': 0, 'label_name': 'red'}
                                                  for i in range(3)])
    with pytest.raises(ValueError, match=r"outside_root: '../val/0.jpg'"):
        evaluate.check_eval_set(str(folder), str(escaping))


def test_retrieval_without_a_caption_names_file_and_line(tmp_path):
    """Break it catches: the caption's own error (data.RecordError) escaping without the line."""
    folder = tmp_path / 'val'
    meta = colour_val_set(folder)
    lines = meta.read_text().splitlines()
    lines[2] = lines[2][:-1] + ', "caption": ["  "]}'
    meta.write_text('\n'.join(l[:-1] + ', "caption": "a red one"}' if n != 2 else l for n, l in enumerate(lines)))
    with pytest.raises(ValueError, match=rf'^{meta}:3: no caption \(retrieval needs one per image\)$'):
        evaluate.evaluate(ColourModel(), val_root=str(folder), val_meta=str(meta), task='retrieval', prompts='cc',
                          class_names=None, batch=3, workers=0, device=torch.device('cpu'),
                          autocast=torch.autocast('cpu', enabled=False))
