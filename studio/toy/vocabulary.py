"""What the toy model can know: ShapesWorld's one vocabulary, and the words it must ignore.

Everything here is built from the caption tables in `studio.toy.captions`, so
the warning in `studio sample`, the web app's vocabulary panel and the erasure
benches' synonym sets all read the same lists.

- `VOCABULARY`: category -> attribute -> the phrases captions use for it
  (shapes with their synonyms; star and heart are in it but marked
  `HELDOUT_SHAPES`: the toy model never saw them).
- `KNOWN_WORDS`: every word of those phrases, plus the caption templates' own
  words ("a", "on", "background").
- `unknown_words(prompt)`: the words of a prompt the toy model ignores.
- Filler words: an English word list (`english-words.txt`, shipped beside this
  file) split once, by a hash of each word, into `TRAINING_FILLERS` (the text
  encoder learns to ignore them) and `HELDOUT_FILLERS` (never in a training
  caption; the report's paraphrase prompts use them).

Example:
    >>> unknown_words("A photo of a RED circle, high quality")
    ['photo', 'of', 'high', 'quality']
    >>> unknown_words("a red sks", allowed=["sks"])
    []
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from importlib import resources

from studio.toy.captions import (
    BACKGROUND_WORDS,
    COLOR_WORDS,
    POSITION_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
    TEXTURE_WORDS,
)
from studio.toy.render import HELDOUT_SHAPES

VOCABULARY: dict[str, dict[str, list[str]]] = {
    "shape": SHAPE_WORDS,
    "color": COLOR_WORDS,
    "texture": TEXTURE_WORDS,
    "size": SIZE_WORDS,
    "position": POSITION_WORDS,
    "background": BACKGROUND_WORDS,
}
# The words the caption templates add around the attribute phrases.
TEMPLATE_WORDS = frozenset({"a", "an", "on", "background"})

_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")


def words(text: str) -> list[str]:
    """The lower-cased words of `text` (hyphenated words stay whole), punctuation dropped.

    Example:
        >>> words("A polka-dot Circle, in the MIDDLE!")
        ['a', 'polka-dot', 'circle', 'in', 'the', 'middle']
    """
    return _WORD.findall(text.lower())


def _phrase_words(table: dict[str, list[str]]) -> set[str]:
    return {w for phrases in table.values() for phrase in phrases for w in words(phrase)}


KNOWN_WORDS: frozenset[str] = frozenset(set(TEMPLATE_WORDS).union(*(_phrase_words(t) for t in VOCABULARY.values())))
# Words that name a held-out shape: known to the vocabulary, never learned by the toy model.
HELDOUT_WORDS: frozenset[str] = frozenset(_phrase_words({s: SHAPE_WORDS[s] for s in HELDOUT_SHAPES}) - _phrase_words(
    {s: v for s, v in SHAPE_WORDS.items() if s not in HELDOUT_SHAPES}))


def unknown_words(prompt: str, allowed: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Words of `prompt` the toy model ignores (each once, in order); `allowed` (trigger words) are not counted.

    Held-out shape words ("star", "heart") are listed too: the toy model never learned them.

    Example:
        >>> unknown_words("draw me a red star, sks style", allowed=["sks"])
        ['draw', 'me', 'star', 'style']
    """
    allowed_words = {w for a in allowed for w in words(a)}
    seen: list[str] = []
    for w in words(prompt):
        if (w not in KNOWN_WORDS or w in HELDOUT_WORDS) and w not in allowed_words and w not in seen:
            seen.append(w)
    return seen


def prompt_warnings(prompts: list[str], allowed: list[str] | tuple[str, ...] = ()) -> list[str]:
    """One line per prompt that has words the toy model ignores; none for a prompt it fully knows.

    Example:
        >>> prompt_warnings(["a photo of a red circle", "a red circle"])
        ["ignored by the toy model: photo, of (in 'a photo of a red circle')"]
    """
    lines = []
    for prompt in prompts:
        unknown = unknown_words(prompt, allowed)
        if unknown:
            named = [f"{w} (held out: never learned)" if w in HELDOUT_WORDS else w for w in unknown]
            lines.append(f"ignored by the toy model: {', '.join(named)} (in {prompt!r})")
    return lines


def describe() -> str:
    """The vocabulary as Markdown: one line per category, synonyms after a slash.

    Example:
        >>> describe().splitlines()[0].startswith("- **shapes**: circle / disk")
        True
    """
    labels = {"shape": "shapes", "color": "colours", "texture": "textures", "size": "sizes",
              "position": "positions", "background": "backgrounds"}
    lines = []
    for category, table in VOCABULARY.items():
        items = []
        for value, phrases in table.items():
            text = " / ".join(phrases)
            if category == "shape" and value in HELDOUT_SHAPES:
                text += " (held out: never learned, teach it with an adapter)"
            items.append(text)
        lines.append(f"- **{labels[category]}**: " + "; ".join(items))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- filler words

# Phrases people put around a prompt; all of them are training fillers.
PROMPT_PHRASES = (
    "a photo of", "a picture of", "an image of", "a drawing of", "a painting of", "an illustration of",
    "a rendering of", "a close-up of", "draw me", "please draw", "show me", "make", "generate", "create",
    "i want", "give me", "here is", "this is", "there is", "high quality", "highly detailed", "best quality",
    "masterpiece", "4k", "8k", "hd", "sharp focus", "digital art", "vector art", "clipart", "simple",
    "minimal", "trending on artstation", "award winning", "very", "really", "nice", "beautiful", "cute",
    "the", "of", "with", "and", "that", "is", "it", "its", "my", "your", "some", "one", "single", "only",
    "please", "thanks", "just", "kind", "sort", "style", "art", "photo", "picture", "image", "shot",
)
# Words that would name an attribute the toy world has no word for (a colour, a shape): never
# fillers, so the model is not taught that "pink" or "circles" mean nothing in particular.
NOT_FILLERS = frozenset({
    "pink", "brown", "cyan", "magenta", "crimson", "scarlet", "maroon", "navy", "teal", "turquoise", "indigo",
    "lavender", "lilac", "olive", "beige", "tan", "gold", "golden", "silver", "colour", "color", "colored",
    "coloured", "oval", "rectangle", "rectangular", "ring", "ball", "sphere", "cube", "pentagon", "hexagon",
    "octagon", "dot", "dots", "stripe", "stripes", "check", "checks", "spot", "spots", "left", "right", "top",
    "bottom", "middle", "center", "centre", "corner", "upper", "lower", "no", "not", "without", "never", "none",
})


def _is_filler(word: str) -> bool:
    if word in KNOWN_WORDS or word in NOT_FILLERS:
        return False
    # Inflections of a known word ("circles", "reddish", "squared") are not meaningless either.
    return not any(word.startswith(k) and len(word) - len(k) <= 3 for k in KNOWN_WORDS if len(k) >= 3)


def _heldout(word: str) -> bool:
    """One word in five, chosen by a hash of the word, so the split never changes."""
    return hashlib.sha1(word.encode()).digest()[0] % 5 == 0


@lru_cache(maxsize=1)
def _english_words() -> tuple[str, ...]:
    text = resources.files("studio.toy").joinpath("english-words.txt").read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip().isalpha())


@lru_cache(maxsize=1)
def english_word_set() -> frozenset[str]:
    """Every word of the shipped English word list (fillers or not), for telling words from non-words."""
    return frozenset(_english_words())


@lru_cache(maxsize=1)
def filler_words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(training fillers, held-out fillers): English words the toy vocabulary does not have.

    Every word of `PROMPT_PHRASES` is a training filler; a held-out filler never
    appears in a training caption (`tests/test_vocabulary.py` checks it).

    Example:
        >>> train, heldout = filler_words()
        >>> len(train) > 5000 and len(heldout) > 1000 and not set(train) & set(heldout)
        True
    """
    phrase_words = {w for p in PROMPT_PHRASES for w in words(p)}
    pool = [w for w in _english_words() if _is_filler(w)]
    heldout = tuple(w for w in pool if _heldout(w) and w not in phrase_words)
    held = set(heldout)
    train = tuple(sorted({w for w in pool if w not in held} | (phrase_words - KNOWN_WORDS)))
    return train, heldout
