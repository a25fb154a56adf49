"""The English and the Spanish README state the same facts, and every relative link in them resolves.

Fast and self-contained: it reads Markdown files only (no servers, no TensorFlow).
"""
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGLISH = ROOT / "README.md"
SPANISH = ROOT / "README.es.md"
READMES = (ENGLISH, SPANISH)
MAX_README_CHARS = 10_000

# A Spanish page stands for its English twin when the two READMEs' links are compared.
DOC_TWINS = {"docs/es/ensenar.md": "docs/teaching.md", "docs/es/glosario.md": "docs/glossary.md"}

FENCE = re.compile(r"^```.*?^```[^\n]*$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.MULTILINE)


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def prose(markdown: str) -> str:
    """The Markdown without its fenced code blocks (a `# comment` there is no heading)."""
    return FENCE.sub("", markdown)


def relative_links(markdown: str):
    return [target for target in LINK.findall(prose(markdown))
            if not re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces made hyphens."""
    heading = re.sub(r"<[^>]+>", "", heading)  # <sup> and such
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path):
    found, seen = set(), {}
    for heading in HEADING.findall(prose(read(path))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(page: Path):
    problems = []
    for target in relative_links(read(page)):
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / unquote(path_part)).resolve() if path_part else page
        if not resolved.exists():
            problems.append(f"{target} (no file {resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved})")
        elif anchor and resolved.suffix == ".md" and unquote(anchor) not in anchors(resolved):
            problems.append(f"{target} (no heading with anchor #{unquote(anchor)} in {resolved.relative_to(ROOT)})")
    return problems


def differ(fact: str, english, spanish) -> str:
    return (f"The READMEs disagree on {fact}:\n"
            f"  README.md:    {english}\n"
            f"  README.es.md: {spanish}")


def number(text: str) -> float:
    return float(text.replace(",", "."))  # 3,3 in Spanish is 3.3 in English


def memory_figures(markdown: str, unit: str):
    return sorted({number(n) for n in re.findall(rf"(\d+(?:[.,]\d+)?)\s*{unit}\b", markdown)})


def test_readme_is_short_enough_for_learners():
    length = len(read(ENGLISH))
    assert length <= MAX_README_CHARS, (
        f"README.md has {length:,} characters, more than {MAX_README_CHARS:,}: move details to docs/ "
        f"and link them")


@pytest.mark.parametrize("readme", READMES, ids=lambda path: path.name)
def test_every_relative_link_resolves(readme):
    assert not broken_links(readme), f"{readme.name} has broken links:\n  " + "\n  ".join(broken_links(readme))


# JupyterLab leaves copies of what a learner opened in .ipynb_checkpoints/ folders: not pages of the series.
DOCS = sorted(page for page in (ROOT / "docs").rglob("*.md") if ".ipynb_checkpoints" not in page.parts)


@pytest.mark.parametrize("page", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_in_the_docs_resolves(page):
    problems = broken_links(page)
    assert not problems, f"{page.relative_to(ROOT)} has broken links:\n  " + "\n  ".join(problems)


def test_same_peak_memory_for_make_run():
    english, spanish = (memory_figures(read(readme), "GiB") for readme in READMES)
    assert english, "README.md no longer gives the memory measured at the peak of `make run` (in GiB)"
    assert english == spanish, differ("the memory measured at the peak of `make run` (GiB)", english, spanish)


def test_same_memory_and_disk_figures():
    english, spanish = (memory_figures(read(readme), "GB") for readme in READMES)
    assert english == spanish, differ("the sizes in GB (the set-up, free memory, `make benchmark`)", english, spanish)


def make_targets():
    phony = re.search(r"^\.PHONY:(.*)$", read(ROOT / "Makefile"), re.MULTILINE)
    return phony.group(1).split()


def test_same_make_commands():
    def mentioned(markdown):
        return sorted(f"make {target}" for target in make_targets()
                      if re.search(rf"\bmake {re.escape(target)}(?![\w-])", markdown))
    english, spanish = (mentioned(read(readme)) for readme in READMES)
    assert english == spanish, differ(
        "the make commands they mention "
        f"(only in README.md: {sorted(set(english) - set(spanish))}, "
        f"only in README.es.md: {sorted(set(spanish) - set(english))})", english, spanish)
    assert {"make run", "make test"} <= set(english), "README.md no longer names its two commands"


def python_versions(markdown: str):
    return sorted(set(re.findall(r"[Pp]ython\s?(?:from |desde el )?(3\.\d+)", markdown)))


def test_same_python_versions():
    english, spanish = (python_versions(read(readme)) for readme in READMES)
    assert english, "README.md no longer says which Python the series needs"
    assert english == spanish, differ("the Python versions (the servers' 3.10, the client's minimum)", english, spanish)


def test_same_tensorflow_and_tf_encrypted_versions():
    def versions(markdown):
        return sorted(set(re.findall(r"\b(TensorFlow|tf-encrypted) (\d+\.\d+\.\d+)", markdown)))
    english, spanish = (versions(read(readme)) for readme in READMES)
    assert english == spanish, differ("the TensorFlow and tf-encrypted versions", english, spanish)


def linked_files(readme: Path):
    """What a README links to, inside the repository, with translations standing for their originals."""
    linked = set()
    for target in relative_links(read(readme)):
        path = (readme.parent / unquote(target.partition("#")[0])).resolve()
        if path in (ENGLISH, SPANISH):
            continue  # each README links the other
        name = path.relative_to(ROOT).as_posix() + ("/" if path.is_dir() else "")
        name = DOC_TWINS.get(name, name)
        notebook = re.fullmatch(r"notebooks/(?:es/)?(\d\d)_.*\.ipynb", name)
        if notebook:
            name = f"notebook {notebook.group(1)}"
        elif name == "notebooks/es/":
            name = "notebooks/"
        linked.add(name)
    return linked


def test_same_docs_and_notebooks_linked():
    english, spanish = (linked_files(readme) for readme in READMES)
    assert english == spanish, differ(
        "the files they link "
        f"(only in README.md: {sorted(english - spanish)}, only in README.es.md: {sorted(spanish - english)})",
        sorted(english), sorted(spanish))
    assert any(name.startswith("notebook ") for name in english), "README.md links no notebook"


def test_each_readme_links_the_other():
    assert "README.es.md" in relative_links(read(ENGLISH)), "README.md does not link README.es.md"
    assert "README.md" in [t.partition("#")[0] for t in relative_links(read(SPANISH))], \
        "README.es.md does not link README.md"
