"""Haystacks: the long texts needles are hidden in.

Three sources, named by a string so that results files can record them:

- ``"filler"``: RULER's "noise", the sentence block "The grass is green. The sky
  is blue. ..." repeated.
- ``"essay"``: natural English prose generated from text every CPython
  installation has: the language reference topics in ``pydoc_data.topics``
  (what ``help("assignment")`` prints). Headings, grammar rules and indented
  code are dropped; paragraphs are kept in a fixed order. The text depends on
  the Python version, which results files record.
- a path: a directory of ``.txt`` files (read in name order) or one ``.txt`` file,
  for the user's own text (e.g. Paul Graham's essays, as the original NIAH uses).

Texts are repeated when a prompt needs more than they hold.
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass
from pathlib import Path

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
BUILTIN = ("filler", "essay")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")


@dataclass(frozen=True)
class Haystack:
    """A text as an ordered sequence of sentences.

    Attributes:
        name: ``"filler"``, ``"essay"`` or the path it was read from.
        sentences: the sentences, in reading order.
    """

    name: str
    sentences: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.sentences:
            raise ValueError(f"haystack {self.name!r} has no text")

    def take(self, count: int) -> list[str]:
        """The first ``count`` sentences, cycling through the text as needed."""
        n = len(self.sentences)
        return [self.sentences[i % n] for i in range(max(count, 0))]

    def text(self, count: int) -> str:
        """The first ``count`` sentences joined by spaces."""
        return " ".join(self.take(count))

    def words(self, count: int) -> list[str]:
        """The first ``count`` words of the text cycled (the last sentence may be cut),
        split back into sentences; RULER fills its essay haystacks this way."""
        words = self._words
        text = " ".join(words[i % len(words)] for i in range(max(count, 0)))
        return split_sentences(text)

    @functools.cached_property
    def _words(self) -> tuple[str, ...]:
        return tuple(" ".join(self.sentences).split())


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences at '.', '!' or '?' followed by space and a capital or digit."""
    text = " ".join(text.split())
    return [s for s in _SENTENCE_END.split(text) if s]


def load_haystack(source: str) -> Haystack:
    """The haystack named ``source``: ``"filler"``, ``"essay"``, or a .txt file or directory."""
    if source == "filler":
        return Haystack("filler", tuple(split_sentences(FILLER)))
    if source == "essay":
        return Haystack("essay", tuple(split_sentences(stdlib_prose())))
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
        if not files:
            raise FileNotFoundError(f"haystack directory {path} holds no .txt files")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(
            f"haystack {source!r} is neither {' nor '.join(map(repr, BUILTIN))} nor an existing .txt file or directory"
        )
    sentences: list[str] = []
    for file in files:
        for paragraph in re.split(r"\n\s*\n", file.read_text(encoding="utf-8", errors="replace")):
            sentences.extend(split_sentences(paragraph))
    return Haystack(str(path), tuple(sentences))


@functools.lru_cache(maxsize=1)
def stdlib_prose() -> str:
    """Prose paragraphs of the Python language reference shipped in ``pydoc_data``.

    Raises:
        FileNotFoundError: when this Python installation lacks ``pydoc_data``
            (some distributions strip it); pass a directory of .txt files instead.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise FileNotFoundError(
            "the 'essay' haystack needs the standard module pydoc_data.topics, missing from this Python; "
            "pass a directory of .txt files as the haystack instead"
        ) from None
    paragraphs: list[str] = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            lines = block.split("\n")
            # Prose paragraphs start at column 0; headings are underlined with
            # ***, ===, --- or ~~~; code and grammar rules are indented.
            if not lines or lines[0].startswith((" ", "\t", "*", ">>>", "[")):
                continue
            if len(lines) > 1 and re.fullmatch(r"[*=~^-]+", lines[1].strip() or "x"):
                continue
            text = re.sub(r"\s*\[\d+\]", "", " ".join(line.strip() for line in lines))  # footnote marks
            words = text.split()
            letters = sum(ch.isalpha() for ch in text)
            if len(words) < 12 or letters < 0.7 * len(text) or not text.endswith((".", ":")):
                continue
            paragraphs.append(text.rstrip(":") + ("" if text.endswith(".") else "."))
    return "\n\n".join(paragraphs)


@functools.lru_cache(maxsize=1)
def word_pool() -> tuple[str, ...]:
    """Distinct lower-case words of 4 to 10 letters from :func:`stdlib_prose`, sorted.

    Stands in for the ``wonderwords`` noun/adjective lists RULER draws keys and
    common words from (about 2,000 words on CPython 3.11).
    """
    words = set(re.findall(r"\b[a-z]{4,10}\b", stdlib_prose()))
    return tuple(sorted(words))


def python_version() -> str:
    """The Python version the 'essay' haystack and word pool were generated with."""
    return ".".join(map(str, sys.version_info[:3]))
