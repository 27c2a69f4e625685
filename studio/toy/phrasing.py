"""Free phrasings of ShapesWorld captions: what people type, paired with what it means.

The toy text encoder v2 is distilled on pairs (`caption_pair`): a caption in
the v1 form ("a red striped circle in the top left"), which the v1 text
encoder and the UNet understand, and a free phrasing of the same attributes
with the same synonyms — reordered ("a circle, red, striped"), with filler
words and prompt phrases around and between them ("a photo of ...",
"..., high quality"), in other letter cases and punctuation. Fillers come
from `vocabulary.filler_words()[0]` only, so the held-out fillers stay out of
every training caption.

The report's paraphrase and distractor prompts (`paraphrase_prompts`,
`distractor_prompts`) use the held-out fillers instead.

Example:
    >>> import numpy as np
    >>> from studio.toy.render import ShapeSpec
    >>> v1, free = caption_pair(ShapeSpec("circle", "red", "striped"), np.random.default_rng(1))
    >>> isinstance(v1, str) and isinstance(free, str)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from studio.toy.captions import (
    BACKGROUND_WORDS,
    COLOR_WORDS,
    MENTION_PROBABILITY,
    POSITION_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
    TEXTURE_WORDS,
    caption_from_words,
)
from studio.toy.render import ShapeSpec
from studio.toy.vocabulary import PROMPT_PHRASES, filler_words

PREFIX_SHARE, SUFFIX_SHARE, INSERT_SHARE = 0.55, 0.5, 0.3
UNCHANGED_SHARE = 0.15  # the v1 caption itself, so known phrasings keep their meaning exactly
EMPTY_SHARE = 0.04  # "" or fillers only: the unconditional embedding
NONWORD_SHARE = 0.2  # a trigger-like non-word ("sks") in both captions: it keeps v1's meaning, unlike English fillers


def _article(phrase: str, rng: np.random.Generator) -> str:
    roll = rng.random()
    if roll < 0.6:
        return ("an " if phrase[:1] in "aeiou" else "a ") + phrase
    return ("the " + phrase) if roll < 0.75 else phrase


def _fillers(rng: np.random.Generator, pool: tuple[str, ...], most: int) -> str:
    """1..`most` filler words, or (a third of the time) a common prompt phrase."""
    if rng.random() < 0.35:
        return PROMPT_PHRASES[rng.integers(len(PROMPT_PHRASES))]
    return " ".join(pool[i] for i in rng.integers(len(pool), size=int(rng.integers(1, most + 1))))


def _letter_case(text: str, rng: np.random.Generator) -> str:
    roll = rng.random()
    if roll < 0.65:
        return text
    if roll < 0.82:
        return text[:1].upper() + text[1:]
    return text.upper() if roll < 0.93 else text.title()


def free_phrasing(
    adjectives: list[str], noun: str, extras: list[str], rng: np.random.Generator, pool: tuple[str, ...]
) -> str:
    """The object phrase in one of several word orders, the extra phrases around it, fillers, case.

    Example:
        >>> free_phrasing(["red"], "circle", [], np.random.default_rng(0), ("hat",)).lower().count("red")
        1
    """
    adjectives = [adjectives[i] for i in rng.permutation(len(adjectives))] if rng.random() < 0.5 else adjectives
    style = rng.random()
    if not adjectives or style < 0.55:
        obj = _article(" ".join(adjectives + [noun]), rng)
    elif style < 0.8:
        obj = _article(noun, rng) + (", " if rng.random() < 0.7 else " ") + ", ".join(adjectives)
    else:
        obj = _article(noun, rng) + " that is " + " and ".join(adjectives)
    parts = [obj] + list(extras)
    if len(parts) > 1 and rng.random() < 0.3:  # an extra phrase first: "in the top left, a red circle"
        parts = [parts[-1]] + parts[:-1] if rng.random() < 0.5 else [parts[1], parts[0]] + parts[2:]
    if rng.random() < INSERT_SHARE:
        parts.insert(int(rng.integers(1, len(parts) + 1)), _fillers(rng, pool, 2))
    text = (", " if rng.random() < 0.3 else " ").join(parts)
    if rng.random() < PREFIX_SHARE:
        text = _fillers(rng, pool, 3) + (" " if rng.random() < 0.7 else ": ") + text
    if rng.random() < SUFFIX_SHARE:
        text += (", " if rng.random() < 0.6 else " ") + _fillers(rng, pool, 4)
    if rng.random() < 0.2:
        text += "." if rng.random() < 0.7 else "!"
    return _letter_case(text, rng)


@dataclass(frozen=True)
class CaptionParts:
    """One caption's chosen words: the v1 caption and the pieces a free phrasing is built from."""

    v1: str
    adjectives: tuple[str, ...] = ()
    noun: str = ""
    extras: tuple[str, ...] = ()


def caption_parts(spec: ShapeSpec, rng: np.random.Generator) -> CaptionParts:
    """Random synonyms and mentions for one image, as in v1's training captions (4% are the empty caption).

    Example:
        >>> caption_parts(ShapeSpec("square", "blue"), np.random.default_rng(3)).noun in ("", "square", "square shape")
        True
    """
    if rng.random() < EMPTY_SHARE:
        return CaptionParts("")

    def choose(options):
        return options[rng.integers(len(options))]

    named = {k: bool(rng.random() < p) for k, p in MENTION_PROBABILITY.items()}
    size = choose(SIZE_WORDS[spec.size]) if named["size"] else None
    color = choose(COLOR_WORDS[spec.color]) if named["color"] else None
    texture = choose(TEXTURE_WORDS[spec.texture]) if named["texture"] else None
    noun = choose(SHAPE_WORDS[spec.shape])
    position = choose(POSITION_WORDS[spec.position]) if named["position"] else None
    background = choose(BACKGROUND_WORDS[spec.background]) if named["background"] else None
    adjectives = tuple(w for w in (size, color, texture) if w)
    extras = tuple(p for p in (position, f"on a {background} background" if background else None) if p)
    if rng.random() < NONWORD_SHARE:
        # A trigger word as personalization uses them ("a red sks"): v1's text encoder gives it an embedding of
        # its own that adapters learn to key on, so the v1 caption carries it too and v2 must keep it.
        word = random_nonword(rng)
        noun = word if rng.random() < 0.5 else f"{word} {noun}"
    return CaptionParts(caption_from_words(list(adjectives), noun, position, background), adjectives, noun, extras)


def random_nonword(rng: np.random.Generator) -> str:
    """2-5 random letters that are neither a vocabulary word nor an English word of the filler list ("sks", "qzv").

    Example:
        >>> word = random_nonword(np.random.default_rng(0))
        >>> word.isalpha() and 2 <= len(word) <= 5
        True
    """
    from studio.toy.vocabulary import KNOWN_WORDS, english_word_set

    while True:
        word = "".join(chr(ord("a") + int(i)) for i in rng.integers(26, size=int(rng.integers(2, 6))))
        if word not in KNOWN_WORDS and word not in english_word_set():
            return word


def rephrase(parts: CaptionParts, rng: np.random.Generator) -> str:
    """A free phrasing of `parts` (15% of the time the v1 caption itself); fillers only for the empty caption.

    Example:
        >>> rephrase(CaptionParts("a red circle", ("red",), "circle"), np.random.default_rng(0)).lower().count("red")
        1
    """
    pool = filler_words()[0]
    if not parts.v1:
        return "" if rng.random() < 0.5 else _letter_case(_fillers(rng, pool, 3), rng)
    if rng.random() < UNCHANGED_SHARE:
        return parts.v1
    return free_phrasing(list(parts.adjectives), parts.noun, list(parts.extras), rng, pool)


def caption_pair(spec: ShapeSpec, rng: np.random.Generator) -> tuple[str, str]:
    """(v1 caption, free phrasing of it) for one image, with random synonyms and mentions.

    Example:
        >>> v1, free = caption_pair(ShapeSpec("square", "blue"), np.random.default_rng(3))
        >>> isinstance(v1, str) and isinstance(free, str)
        True
    """
    parts = caption_parts(spec, rng)
    return parts.v1, rephrase(parts, rng)


# ----------------------------------------------------------------------------- evaluation prompts

PARAPHRASE_TEMPLATES = (
    "{w1} of a {color} {shape}",
    "a {shape}, {color}, {w1} {w2}",
    "{W1} {w2}: {color} {shape}.",
    "the {color} {shape} {w1}",
    "{color} {shape} {w1} {w2} {w3}",
    "{W1}, a {shape} that is {color}",
    "{w1} {w2} {color} {shape}, {w3}",
    "A {COLOR} {SHAPE} {W1}!",
)


DISTRACTOR_TEMPLATES = (
    "a {color} {shape} {w1} {w2}",
    "{w1} {w2} a {color} {shape}",
    "a {color} {w1} {shape} {w2}",
    "{w1} a {color} {shape} {w2} {w3}",
)


def paraphrase_prompts(n: int, seed: int = 0) -> tuple[list[str], list[dict]]:
    """`n` prompts naming a seen shape and a colour in templates with held-out filler words.

    Example:
        >>> prompts, expected = paraphrase_prompts(2)
        >>> len(prompts), sorted(expected[0])
        (2, ['color', 'shape'])
    """
    return template_prompts(n, seed, PARAPHRASE_TEMPLATES, filler_words()[1])


def distractor_prompts(n: int, seed: int = 0) -> tuple[list[str], list[dict]]:
    """`n` canonical prompts ("a red circle") with held-out filler words before, after or between.

    Example:
        >>> distractor_prompts(1)[0][0].count(" ") >= 2
        True
    """
    return template_prompts(n, seed + 1, DISTRACTOR_TEMPLATES, filler_words()[1])


def template_prompts(
    n: int, seed: int, templates: tuple[str, ...], fillers: tuple[str, ...]
) -> tuple[list[str], list[dict]]:
    """`n` prompts from `templates` (cycled) with a random seen shape and colour, and `fillers` for {w1}..{w3}.

    Example:
        >>> template_prompts(1, 0, ("a {color} {shape} {w1}",), ("hat",))[0][0].endswith("hat")
        True
    """
    from studio.toy.render import COLORS, SEEN_SHAPES

    rng = np.random.default_rng(seed)
    prompts, expected = [], []
    for i in range(n):
        shape, color = SEEN_SHAPES[rng.integers(len(SEEN_SHAPES))], list(COLORS)[rng.integers(len(COLORS))]
        w = [fillers[j] for j in rng.integers(len(fillers), size=3)]
        fields = {"shape": shape, "color": color, "SHAPE": shape.upper(), "COLOR": color.upper(),
                  "w1": w[0], "w2": w[1], "w3": w[2], "W1": w[0].capitalize()}
        prompts.append(templates[i % len(templates)].format(**fields))
        expected.append({"shape": shape, "color": color})
    return prompts, expected
