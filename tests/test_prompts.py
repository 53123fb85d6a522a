"""Prompt files (text.load_prompts): OpenAI's {} placeholder means the same as {0}; a template without a placeholder (every
class would get the same text, a constant classifier) is refused naming file:line."""
import pytest

import text


def test_openai_placeholder_gives_the_same_prompts(tmp_path):
    """(Break caught: {} left as is, so every class gets 'a photo of a {}.')"""
    (tmp_path / 'openai.txt').write_text('a photo of a {}.\nitap of a {}.\n')
    (tmp_path / 'ours.txt').write_text('a photo of a {0}.\nitap of a {0}.\n')
    openai, ours = (text.load_prompts(f'file:{tmp_path / n}') for n in ('openai.txt', 'ours.txt'))
    assert openai == ours == ['a photo of a {0}.', 'itap of a {0}.']
    assert text.class_prompts(['cat', 'dog'], openai) == [['a photo of a cat.', 'itap of a cat.'],
                                                               ['a photo of a dog.', 'itap of a dog.']]


def test_a_template_without_placeholder_is_refused_naming_file_and_line(tmp_path):
    (tmp_path / 'p.txt').write_text('a photo of a {0}.\n\na photo of a thing.\n')
    with pytest.raises(ValueError, match=r'p\.txt:3: template .a photo of a thing\.. has no class placeholder'):
        text.load_prompts(f'file:{tmp_path / "p.txt"}')


def test_classes_that_cannot_be_told_apart(capsys):
    """Every class alike is refused; a duplicate name is a warning naming it. (Break caught: the
    check comparing class names instead of their prompt texts.)"""
    with pytest.raises(ValueError, match='every class gets the same prompt texts'):
        text.class_prompts(['cat', 'cat'], ['a photo of a {0}.'])
    texts = text.class_prompts(['crane', 'cat', 'crane'], ['a photo of a {0}.'])
    assert texts[0] == texts[2] == ['a photo of a crane.']
    assert "classes ['crane', 'crane'] get the same prompt texts" in capsys.readouterr().out
    assert text.class_prompts(['cat'], ['{0}']) == [['cat']]   # one class is not "all alike"
