"""Zero-shot evaluation: top-1 / top-5 against a brute-force ranking over more than five classes,
classifier rows (normalised prompt means, row k for label k), the prompt sets of the reference's
table, and the in-run evaluation using config.eval.prompts."""
import json

import pytest
import torch

import data
import evaluate
import text
import train
from helpers import SMOKE, tiny_model, write_jpeg
from tiny_step import one_thread, tiny_state  # noqa: F401  (one_thread: a fixture)

CLASSES, DIM = 12, 8


class TableModel(torch.nn.Module):
    """encode_image of an image whose first pixel holds i (the loader's uint8, normalised with
    mean 0 and std 1) is row i of a fixed feature table."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def encode_image(self, pixels):
        return self.table[(pixels[:, 0, 0, 0] * 255).round().long()]


def test_top1_and_top5_against_a_brute_force_ranking():
    """45 images, 12 classes with non-contiguous labels, three loader batches: top-1 and top-5 are
    the shares of images whose label is the best / among the five best classes by cosine, ranked
    here with Python's sort. Breaks it catches: top-5 taken over fewer (or more) than 5 classes,
    a batch's counts replacing instead of adding to the running ones, class row k not mapped to
    label_ids[k]."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(45, DIM, generator=g)
    classifier = torch.nn.functional.normalize(torch.randn(CLASSES, DIM, generator=g), dim=-1)
    label_ids = [3 * k + 100 for k in torch.randperm(CLASSES, generator=g).tolist()]
    labels = torch.tensor(label_ids)[torch.randint(CLASSES, (45,), generator=g)]
    pixels = torch.zeros(45, 3, 2, 2, dtype=torch.uint8)
    pixels[:, 0, 0, 0] = torch.arange(45, dtype=torch.uint8)
    loader = [(pixels[i:i + 15], labels[i:i + 15], torch.arange(i, i + 15)) for i in (0, 15, 30)]
    got = evaluate.zero_shot_eval(TableModel(table), loader, classifier, label_ids=label_ids, device='cpu',
                                  mean=(0, 0, 0), std=(1, 1, 1), autocast=torch.autocast('cpu', enabled=False))
    top1 = top5 = 0
    for feat, label in zip(table.tolist(), labels.tolist()):
        norm = sum(x * x for x in feat) ** 0.5
        scores = [sum(a * b for a, b in zip(feat, row)) / norm for row in classifier.tolist()]
        ranked = [label_ids[k] for k in sorted(range(CLASSES), key=lambda k: -scores[k])]
        top1 += ranked[0] == label
        top5 += label in ranked[:5]
    assert 0 < top1 < top5 < 45                           # the two metrics differ here
    assert got['images'] == 45
    assert got['zeroshot_top1'] == pytest.approx(100 * top1 / 45, abs=1e-9)
    assert got['zeroshot_top5'] == pytest.approx(100 * top5 / 45, abs=1e-9)


def test_prompt_sets_are_the_reference_table(tmp_path):
    """prompt1 / 6 / 8 / 80 have 1 / 6 / 8 / 80 templates, each with {0} once (prompt1 is 'a photo
    of a {0}.', prompt8's first template has no final period), 'cc' is the bare class name and
    file:<path> the file's stripped non-blank lines. Breaks it catches: a template lost or a line
    kept unstripped, 'cc' mapped to a template set."""
    counts = {'prompt1': 1, 'prompt6': 6, 'prompt8': 8, 'prompt80': 80}
    for name, n in counts.items():
        templates = text.load_prompts(name)
        assert len(templates) == len(set(templates)) == n, name
        assert all(t.count('{0}') == 1 and t == t.strip() for t in templates), name
    assert text.load_prompts('prompt1') == ['a photo of a {0}.']
    assert text.load_prompts('prompt8')[0] == 'a photo of a {0}'
    assert text.load_prompts('cc') == ['{0}']
    (tmp_path / 'mine.txt').write_text('  a sketch of a {0}  \n\nthe {0}, seen from above\n')
    assert text.load_prompts(f'file:{tmp_path / "mine.txt"}') == ['a sketch of a {0}', 'the {0}, seen from above']


@pytest.mark.usefixtures('one_thread')
def test_in_run_evaluation_uses_config_eval_prompts(tmp_path, monkeypatch):
    """train.zero_shot builds its classifier from the templates config.eval.prompts names, on the
    classes of the evaluation file, and leaves the model in training mode. Break it catches: the
    in-run evaluation on a fixed prompt set (evaluate's default) whatever the config says."""
    cfg, state, _ = tiny_state()
    records = [{'filename': f'{i}.jpg', 'label': i % 3, 'label_name': name}
               for i, name in enumerate(['red circle', 'blue cross', 'green square'] * 2)]
    for i in range(len(records)):
        write_jpeg(tmp_path / f'{i}.jpg', seed=i)
    (tmp_path / 'val.jsonl').write_text('\n'.join(map(json.dumps, records)))
    (tmp_path / 'prompts.txt').write_text('a sketch of a {0}\nthe {0} again\n')
    cfg.data.update(dict(val_root=str(tmp_path), val_meta=str(tmp_path / 'val.jsonl')))
    cfg.eval.update(dict(prompts=f'file:{tmp_path / "prompts.txt"}', workers=0, batch_size=4))
    seen, real = [], evaluate.zero_shot_classifier

    def classifier(model, class_names, templates, **kwargs):
        seen.append((list(class_names), list(templates)))
        return real(model, class_names, templates, **kwargs)
    monkeypatch.setattr(evaluate, 'zero_shot_classifier', classifier)
    metrics = train.zero_shot(state, cfg, 0, 1)
    assert seen == [(['red circle', 'blue cross', 'green square'], ['a sketch of a {0}', 'the {0} again'])]
    assert metrics['images'] == 6 and state.model.training


def test_class_embeddings_that_are_all_alike_are_refused(one_thread):  # noqa: F811
    """Class names beyond the context length: the prompt texts differ, the tokens the model reads do
    not, so every class embedding is the same and a score would be constant. A model whose text
    tower tells them apart passes. (Break caught: the check dropped, or comparing texts only.)"""
    import data
    cfg, state, _ = tiny_state()
    model, ctx = state.model.eval(), cfg.model.context_length
    long = ' '.join(['word'] * ctx)
    with pytest.raises(ValueError, match=f'3 class embeddings are all the same .* {ctx} tokens'):
        evaluate.zero_shot_classifier(model, ['cat', 'dog', 'bird'], [long + ' {0}'], tokenizer=data.get_tokenizer(),
                                      context_length=ctx, device='cpu')
    rows = evaluate.zero_shot_classifier(model, ['cat', 'dog', 'bird'], ['a photo of a {0}'],
                                         tokenizer=data.get_tokenizer(), context_length=ctx, device='cpu')
    assert rows.shape == (3, cfg.model.embed_dim) and (rows[1:] - rows[0]).abs().max() > 1e-3


def test_zero_shot_rows_are_normalised_means_of_normalised_prompt_embeddings():
    """Classifier row = normalise(mean(normalise(prompt embeddings))), unit norm."""
    model = tiny_model()
    names = ['red circle', 'blue square', 'green cross']
    templates = ['a photo of a {0}', 'a drawing of the {0}', '{0}', 'a big {0} on a grey background']
    got = evaluate.zero_shot_classifier(model, names, templates, tokenizer=data.get_tokenizer(),
                                        context_length=SMOKE.model.context_length, device='cpu')
    rows = []
    with torch.no_grad():
        for name in names:
            emb = model.encode_text(data.tokenize([t.replace('{0}', name) for t in templates],
                                                  SMOKE.model.context_length))
            mean = (emb / emb.norm(dim=-1, keepdim=True)).mean(dim=0)
            rows.append(mean / mean.norm())
    torch.testing.assert_close(got, torch.stack(rows), rtol=0, atol=1e-6)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(names)), rtol=0, atol=1e-6)


def test_zero_shot_eval_maps_rows_to_labels():
    """Classifier row k is label_ids[k]: non-contiguous labels are scored correctly."""
    class Fixed(torch.nn.Module):
        def encode_image(self, images):
            return images.float().mean(dim=(2, 3))        # the colour of each (constant) image

    classifier = torch.nn.functional.normalize(torch.eye(3), dim=-1)   # rows: red, green, blue
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    for i, c in enumerate([0, 1, 2, 0]):
        images[i, c] = 255
    labels = torch.tensor([7, 3, 9, 3])       # red=7, green=3, blue=9; the last one is wrong
    loader = [(images, labels, torch.arange(4))]
    m = evaluate.zero_shot_eval(Fixed(), loader, classifier, label_ids=[7, 3, 9], device='cpu',
                                mean=(0, 0, 0), std=(1, 1, 1), autocast=torch.autocast('cpu', enabled=False))
    assert m['zeroshot_top1'] == 75.0 and m['zeroshot_top5'] == 100.0 and m['images'] == 4
