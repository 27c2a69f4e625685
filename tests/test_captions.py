import re

import numpy as np

from studio.toy.captions import (
    BACKGROUND_WORDS,
    COLOR_WORDS,
    POSITION_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
    TEXTURE_WORDS,
    canonical_caption,
    random_caption,
)
from studio.toy.render import SHAPES, ShapeSpec, random_spec

VOCAB = {
    "shape": SHAPE_WORDS,
    "color": COLOR_WORDS,
    "texture": TEXTURE_WORDS,
    "size": SIZE_WORDS,
    "position": POSITION_WORDS,
    "background": BACKGROUND_WORDS,
}


def _mentions(caption: str, phrase: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", caption) is not None


def test_captions_never_name_what_the_image_does_not_show():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        spec = random_spec(rng, SHAPES)
        caption = random_caption(spec, rng)
        for attribute, words in VOCAB.items():
            truth = getattr(spec, attribute)
            for value, phrases in words.items():
                if value == truth:
                    continue
                for phrase in phrases:
                    # "square shape" contains "square"; judge the longest phrase that matches.
                    if _mentions(caption, phrase) and not any(_mentions(caption, p) and phrase in p for p in words[truth]):
                        raise AssertionError(f"{caption!r} names {attribute}={value} but the image has {truth}")
        assert any(_mentions(caption, p) for p in SHAPE_WORDS[spec.shape]), caption


def test_synonyms_and_optional_attributes_vary():
    rng = np.random.default_rng(1)
    spec = ShapeSpec("circle", "purple", "dotted", "gray", "small", "top left")
    captions = {random_caption(spec, rng) for _ in range(300)}
    assert len(captions) > 50
    assert any("disk" in c for c in captions) and any("round shape" in c for c in captions)
    assert any("violet" in c for c in captions) and any("purple" not in c and "violet" not in c for c in captions)


def test_canonical_caption_and_article():
    assert canonical_caption(ShapeSpec("cross", "orange", "plain", "black", position="center")) == (
        "an orange plain cross in the center on a black background"
    )
