"""Captions for ShapesWorld images: templates, synonyms and optional attributes.

A caption only ever names attributes the image has; an attribute left out is
simply unspecified. Canonical captions (`canonical_caption`) use the first
synonym of every word and are what evaluation prompts are built from.

Example:
    >>> from studio.toy.render import ShapeSpec
    >>> canonical_caption(ShapeSpec("circle", "red", "striped", position="top left"))
    'a red striped circle in the top left on a white background'
"""

from __future__ import annotations

import numpy as np

from studio.toy.render import ShapeSpec

SHAPE_WORDS = {
    "circle": ["circle", "disk", "round shape"],
    "square": ["square", "square shape"],
    "triangle": ["triangle", "triangular shape"],
    "cross": ["cross", "plus sign"],
    "diamond": ["diamond", "rhombus"],
    "star": ["star", "star shape"],
    "heart": ["heart", "heart shape"],
}
COLOR_WORDS = {
    "red": ["red"],
    "orange": ["orange"],
    "yellow": ["yellow"],
    "green": ["green"],
    "blue": ["blue"],
    "purple": ["purple", "violet"],
}
TEXTURE_WORDS = {
    "plain": ["plain", "solid"],
    "striped": ["striped", "stripy"],
    "dotted": ["dotted", "polka-dot", "spotted"],
    "checkered": ["checkered", "checkerboard"],
}
SIZE_WORDS = {"small": ["small", "little"], "large": ["large", "big"]}
POSITION_WORDS = {
    "center": ["in the center", "in the middle"],
    "top left": ["in the top left", "in the upper left corner"],
    "top right": ["in the top right", "in the upper right corner"],
    "bottom left": ["in the bottom left", "in the lower left corner"],
    "bottom right": ["in the bottom right", "in the lower right corner"],
}
BACKGROUND_WORDS = {"white": ["white"], "black": ["black"], "gray": ["gray", "grey"]}


def _with_article(words: list[str]) -> str:
    phrase = " ".join(w for w in words if w)
    article = "an" if phrase[:1] in "aeiou" else "a"
    return f"{article} {phrase}"


def caption_from_parts(
    shape: str,
    color: str | None = None,
    texture: str | None = None,
    size: str | None = None,
    position: str | None = None,
    background: str | None = None,
    choose=lambda options: options[0],
) -> str:
    """Build a caption from attribute names; `None` leaves an attribute out.

    Example:
        >>> caption_from_parts("star", color="blue")
        'a blue star'
    """
    return caption_from_words(
        [choose(table[name]) for table, name in ((SIZE_WORDS, size), (COLOR_WORDS, color), (TEXTURE_WORDS, texture))
         if name],
        choose(SHAPE_WORDS[shape]),
        choose(POSITION_WORDS[position]) if position else None,
        choose(BACKGROUND_WORDS[background]) if background else None,
    )


def caption_grid(positions: bool = True, backgrounds: bool = True):
    """Every caption over the shapes the toy model learned x (colour or none) x (texture or none) x (position or
    none) x (background or none), canonical words, as (its attributes, the caption); positions and backgrounds
    left out with False.

    Example:
        >>> next(iter(caption_grid()))
        ({'shape': 'circle', 'color': None, 'texture': None, 'position': None, 'background': None}, 'a circle')
    """
    import itertools

    from studio.toy.render import HELDOUT_SHAPES

    shapes = [s for s in SHAPE_WORDS if s not in HELDOUT_SHAPES]
    for shape, color, texture, position, background in itertools.product(
            shapes, [None, *COLOR_WORDS], [None, *TEXTURE_WORDS], [None, *POSITION_WORDS] if positions else [None],
            [None, *BACKGROUND_WORDS] if backgrounds else [None]):
        parts = {"shape": shape, "color": color, "texture": texture, "position": position, "background": background}
        yield parts, caption_from_parts(**parts)


def caption_from_words(adjectives: list[str], noun: str, position: str | None = None,
                       background: str | None = None) -> str:
    """The caption template over words already chosen: article, adjectives, noun, position phrase, background.

    Example:
        >>> caption_from_words(["big", "red"], "disk", "in the middle", "grey")
        'a big red disk in the middle on a grey background'
    """
    text = _with_article([*adjectives, noun])
    if position:
        text += " " + position
    if background:
        text += f" on a {background} background"
    return text


def canonical_caption(spec: ShapeSpec) -> str:
    """Every attribute, first synonym each (size left out: it is a detail)."""
    return caption_from_parts(
        spec.shape, spec.color, spec.texture, position=spec.position, background=spec.background
    )


# How often each optional attribute is named in a training caption.
MENTION_PROBABILITY = {"color": 0.9, "texture": 0.8, "position": 0.8, "size": 0.4, "background": 0.5}


def random_caption(spec: ShapeSpec, rng: np.random.Generator) -> str:
    """A training caption: random synonyms, each optional attribute named with its probability.

    Example:
        >>> random_caption(ShapeSpec("circle", "red"), np.random.default_rng(0)).endswith(("circle", "disk", "shape", "background", "middle", "center"))
        True
    """

    def choose(options):
        return options[rng.integers(len(options))]

    named = {k: bool(rng.random() < p) for k, p in MENTION_PROBABILITY.items()}
    return caption_from_parts(
        spec.shape,
        color=spec.color if named["color"] else None,
        texture=spec.texture if named["texture"] else None,
        size=spec.size if named["size"] else None,
        position=spec.position if named["position"] else None,
        background=spec.background if named["background"] else None,
        choose=choose,
    )
