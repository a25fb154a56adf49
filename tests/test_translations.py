"""Every notebook has a Spanish twin: the same cells in the same order, the same code, Spanish words."""
import io
import json
import re
import tokenize
from pathlib import Path

import pytest

from private_predictions.series import NOTEBOOK_DIR

SPANISH_DIR = NOTEBOOK_DIR / "es"


def by_number(folder: Path):
    return {path.name[:2]: path for path in sorted(folder.glob("[0-9][0-9]_*.ipynb"))}


def cells(path: Path):
    return json.loads(path.read_text())["cells"]


def source(cell) -> str:
    return "".join(cell["source"])


def code_without_words(code: str):
    """The code's tokens, with comments left out and every string literal alike."""
    tokens = []
    for token in tokenize.generate_tokens(io.StringIO(code + "\n").readline):
        if token.type in (tokenize.COMMENT, tokenize.NL):
            continue
        tokens.append("STRING" if token.type == tokenize.STRING else token.string)
    return tokens


def test_every_notebook_has_a_spanish_twin_and_every_twin_an_original():
    assert by_number(NOTEBOOK_DIR).keys() == by_number(SPANISH_DIR).keys()
    assert by_number(NOTEBOOK_DIR)


PAIRS = [(by_number(NOTEBOOK_DIR)[n], by_number(SPANISH_DIR)[n])
         for n in sorted(by_number(NOTEBOOK_DIR).keys() & by_number(SPANISH_DIR).keys())]


@pytest.mark.parametrize("english, spanish", PAIRS, ids=[english.stem for english, _ in PAIRS])
def test_twins_have_the_same_cells_and_the_same_code(english, spanish):
    ours, theirs = cells(english), cells(spanish)
    assert [c["cell_type"] for c in ours] == [c["cell_type"] for c in theirs]
    for number, (cell, twin) in enumerate(zip(ours, theirs)):
        assert cell["metadata"].get("tags") == twin["metadata"].get("tags"), f"cell {number}: tags differ"
        if cell["cell_type"] == "code":
            assert code_without_words(source(cell)) == code_without_words(source(twin)), \
                f"cell {number}: the code differs beyond comments and strings"


SPANISH_WORDS = re.compile(r"\b(el|la|los|las|de|del|que|un|una|y|en|con|para|por|es)\b")


@pytest.mark.parametrize("english, spanish", PAIRS, ids=[english.stem for english, _ in PAIRS])
def test_what_a_reader_reads_in_a_twin_is_spanish(english, spanish):
    for number, (cell, twin) in enumerate(zip(cells(english), cells(spanish))):
        if cell["cell_type"] == "markdown":
            assert source(twin) != source(cell), f"cell {number} is not translated"
            assert len(SPANISH_WORDS.findall(source(twin))) >= min(3, len(source(twin).split()) // 4), \
                f"cell {number} does not read as Spanish"
        else:
            for text in phrases(source(cell)):
                assert text not in phrases(source(twin)), f"cell {number} still prints {text!r} in English"


def phrases(code: str):
    """The string literals a reader sees printed: with a space and a word, unlike "relu" or "lo"."""
    found = set()
    for token in tokenize.generate_tokens(io.StringIO(code + "\n").readline):
        words = re.sub(r"\{[^}]*\}", "", token.string)  # an f-string's fields are code
        if token.type == tokenize.STRING and " " in words.strip("'\" ") and re.search(r"[a-z]{3}", words):
            found.add(token.string.lstrip("rbfuRBFU"))
    return found
