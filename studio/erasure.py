"""What every concept-erasure method shares: its options, the checks on them, and the prompts it learns from.

An erasure method (SPM, RECE, ANT) is given concepts to erase (`--concept`, one or more) and concepts to keep
(`--preserve`). Its config dataclass extends `EraseOptions`, so the three take the same flags.

The prompts an erasure learns from are the concept in context (`erase_prompts`): on the toy model, every
ShapesWorld caption that names it (the concept is a value of the vocabulary: a shape, a colour, a texture),
paired with the same caption where each erased concept is replaced by its anchor (by default another value of
its category: the toy model's empty prompt draws a circle more than half the time, so "draw what the empty prompt
draws" cannot erase a circle); the captions that name no erased concept are what is kept. On any other model,
the concept alone and in a few prompt templates, paired with the anchor (default " ", the empty prompt, as the
papers do), and the preserved concepts in the same templates.

Example:
    >>> pairs, kept = erase_prompts(EraseOptions(concept=["circle"]), toy=True)
    >>> pairs[0], ("a red square", "a red square") in [(k, k) for k in kept]
    (('circle', 'square'), True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from studio.errors import StudioError

# Prompt templates for a concept on a model other than the toy one (CLIP-style phrasings).
TEMPLATES = ("{}", "a photo of {}", "an image of {}", "a painting of {}", "a drawing of {}", "a picture of {}",
             "a close-up of {}", "{}, high quality")
# On the toy model: the categories a concept can belong to.
TOY_CATEGORIES = ("shape", "color", "texture")


@dataclass
class EraseOptions:
    """The options every erasure method takes: what to erase, what to keep, what an erased concept becomes."""

    concept: list[str] = field(default_factory=list)  # one or more concepts to erase (`--concept circle`)
    preserve: list[str] | None = None  # concepts to keep (default: on the toy model every caption not naming one)
    anchor: str | None = None  # what an erased concept becomes (default: the empty prompt; on the toy model another value of its category)


def _toy_values() -> dict[str, list[str]]:
    """The toy model's learned values per category (held-out shapes left out: it never drew them)."""
    from studio.toy.captions import COLOR_WORDS, SHAPE_WORDS, TEXTURE_WORDS
    from studio.toy.render import HELDOUT_SHAPES

    return {"shape": [s for s in SHAPE_WORDS if s not in HELDOUT_SHAPES], "color": list(COLOR_WORDS),
            "texture": list(TEXTURE_WORDS)}


def toy_category(concept: str) -> str:
    """The ShapesWorld category of a concept the toy model knows ("circle" -> "shape"), or a StudioError.

    Example:
        >>> toy_category("striped")
        'texture'
    """
    for category, values in _toy_values().items():
        if concept in values:
            return category
    from studio.toy.vocabulary import VOCABULARY

    for category in TOY_CATEGORIES:
        for value, phrases in VOCABULARY[category].items():
            if concept.strip().lower() in phrases and value in _toy_values()[category]:
                raise StudioError(f"concept {concept!r} is a name for the toy model's {value!r}: erase it as "
                                  f"--concept {value} (its other names are erased with it)")
    known = "; ".join(f"{c}: {', '.join(v)}" for c, v in _toy_values().items())
    raise StudioError(f"concept {concept!r} is not one the toy model draws; on the toy model erase a shape, a colour "
                      f"or a texture by its first name ({known})")


def check_options(options: EraseOptions, tokenizer=None) -> None:
    """Refuse what no erasure can do: no concept, an empty one, one that tokenizes to nothing (only punctuation),
    a concept also preserved or used as an anchor. `tokenizer`: the model's, to see what a concept becomes.

    Example:
        >>> check_options(EraseOptions(concept=["circle"], preserve=["circle"]))
        Traceback (most recent call last):
        studio.errors.StudioError: --preserve 'circle' is also erased (--concept 'circle'): a concept cannot be both; drop one
    """
    if not options.concept:
        raise StudioError("no concept to erase: pass --concept WORD (e.g. --concept circle), once per concept")
    for concept in options.concept:
        if not isinstance(concept, str) or not concept.strip():
            raise StudioError("--concept '': an empty concept erases nothing; name what to erase (e.g. --concept circle)")
        if tokenizer is not None and not _meaningful_tokens(concept, tokenizer):
            raise StudioError(f"--concept {concept!r} tokenizes to nothing the model reads (only punctuation or "
                              "spaces); name the concept in words")
    erased = {c.strip().lower() for c in options.concept}
    if len(erased) != len(options.concept):
        raise StudioError("the same --concept is given twice; give each concept once")
    for kept in options.preserve or []:
        if kept.strip().lower() in erased:
            raise StudioError(f"--preserve {kept!r} is also erased (--concept {kept!r}): a concept cannot be both; drop one")
    if options.anchor is not None and options.anchor.strip().lower() in erased:
        raise StudioError(f"--anchor {options.anchor!r} is an erased concept: an erased concept cannot become itself; "
                          "choose another anchor")


def model_tokenizer(model: str):
    """The tokenizer of `model` ("toy" or a diffusers folder), loaded alone (fast, no weights); None where it cannot
    be read without loading the model (a single file, a hub id): the concepts are then checked once it loads.

    Example:
        >>> model_tokenizer("toy").model_max_length
        77
    """
    from transformers import AutoTokenizer

    from studio.pipeline import TOY_MODEL, toy_model_path

    folder = (toy_model_path() if model == TOY_MODEL else Path(model).expanduser()) / "tokenizer"
    if not folder.is_dir():
        return None
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError):
        return None  # an unreadable tokenizer: the model's own loading says what is wrong


def _meaningful_tokens(text: str, tokenizer) -> list[int]:
    """The token ids of `text` other than the special ones and pure punctuation."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    words = [tokenizer.decode([i]).strip() for i in ids]
    return [i for i, w in zip(ids, words) if any(ch.isalnum() for ch in w)]


def anchors(options: EraseOptions, toy: bool) -> dict[str, str]:
    """What each erased concept becomes: `--anchor` for all, or the default (toy: the first other value of its
    category that is not erased; otherwise " ").

    Example:
        >>> anchors(EraseOptions(concept=["circle", "square"]), toy=True)
        {'circle': 'triangle', 'square': 'triangle'}
    """
    if options.anchor is not None:
        return {c: options.anchor for c in options.concept}
    if not toy:
        return {c: " " for c in options.concept}
    result = {}
    for concept in options.concept:
        category = toy_category(concept)
        free = [v for v in _toy_values()[category] if v not in options.concept]
        if not free:
            raise StudioError(f"every {category} is erased: nothing is left for {concept!r} to become; erase fewer, "
                              "or give --anchor")
        result[concept] = free[0]
    return result


def erase_prompts(options: EraseOptions, toy: bool) -> tuple[list[tuple[str, str]], list[str]]:
    """(pairs of (prompt naming an erased concept, the same prompt with each erased concept replaced by its
    anchor), prompts to keep). On the toy model the prompts are ShapesWorld captions; elsewhere templates.

    Example:
        >>> pairs, kept = erase_prompts(EraseOptions(concept=["dog"], preserve=["cat"]), toy=False)
        >>> pairs[1], kept[:2]
        (('a photo of dog', 'a photo of  '), ['', 'cat'])
    """
    to = anchors(options, toy)
    if not toy:
        pairs = [(t.format(c), t.format(to[c])) for c in options.concept for t in TEMPLATES]
        kept = [""] + [t.format(p) for p in options.preserve or [] for t in TEMPLATES]
        return pairs, kept
    from studio.toy.captions import caption_from_parts, caption_grid

    for concept in options.concept:
        toy_category(concept)
    pairs, kept = [], [""]
    # Each erased concept alone, then every caption of the toy grid (4,200, positions and backgrounds included),
    # encoded in seconds by the toy text encoder.
    pairs += [(c, to[c]) for c in options.concept]
    for parts, prompt in caption_grid():
        named = {k: parts[k] for k in TOY_CATEGORIES}
        if any(v in options.concept for v in named.values()):
            swapped = {k: to.get(v, v) if v else v for k, v in named.items()}
            pairs.append((prompt, caption_from_parts(swapped["shape"], color=swapped["color"], texture=swapped["texture"],
                                                     position=parts["position"], background=parts["background"])))
        else:
            kept.append(prompt)
    kept += [p for p in options.preserve or [] if p not in kept]
    return pairs, kept


def concept_check_prompts(options: EraseOptions, toy: bool) -> list[str]:
    """The prompts a run draws before and after erasing, side by side: each erased concept, then one kept (the
    first `--preserve`; on the toy model without one, the first concept's anchor, a value it must still draw).

    Example:
        >>> concept_check_prompts(EraseOptions(concept=["circle"]), toy=True)
        ['circle', 'square']
    """
    kept = (options.preserve or [])[:1]
    if not kept and toy:
        kept = [anchors(options, toy)[options.concept[0]]]
    return list(options.concept) + [k for k in kept if k.strip()]


BEFORE_AFTER_NAME = "before-after.png"


def before_after(config, artifact, seeds: tuple[int, ...] = (0, 1, 2, 3)) -> Path:
    """Draw the check prompts (`concept_check_prompts`) without and with the erasure at `artifact`, and write one
    image beside it (`studio.sample.side_by_side`).

    Example:
        >>> before_after(train_config, "outputs/erase/rece.safetensors")  # doctest: +SKIP
        PosixPath('outputs/erase/before-after.png')
    """
    from studio import registry
    from studio.pipeline import TOY_MODEL
    from studio.sample import side_by_side

    options = registry.get(config.method).config(config.method_options)
    prompts = concept_check_prompts(options, toy=config.model == TOY_MODEL)
    return side_by_side(config.model, artifact, prompts, seeds, Path(artifact).parent / BEFORE_AFTER_NAME)
