"""`studio toy report`: how well a model draws ShapesWorld, measured by the evaluator.

Seen prompts name shape, colour, texture and position ("a red striped circle
in the top left"), drawn from the seen shapes with a fixed seed; held-out
prompts ask for a star or a heart, which the toy model never saw, so a low
`heldout_shape_rate` means it does not invent them. Paraphrase prompts name a
shape and a colour in free templates with filler words pretraining never
used ("Locket ostrich: purple cross."); distractor prompts are canonical
prompts with such words around them ("venomous dory a blue circle"): their
shape and colour accuracies say whether free phrasing changes what is drawn.

Example:
    >>> from studio.pipeline import load
    >>> report(load("toy"), n_images=10, n_heldout=4)["shape_acc"] >= 0.0
    True
"""

from __future__ import annotations

import itertools

import numpy as np

from studio.eval import score
from studio.sample import SampleSettings, generate
from studio.toy.captions import caption_from_parts
from studio.toy.phrasing import distractor_prompts, paraphrase_prompts
from studio.toy.render import COLORS, HELDOUT_SHAPES, POSITIONS, SEEN_SHAPES, TEXTURES


def seen_prompt_set(n: int, seed: int = 0) -> tuple[list[str], list[dict]]:
    """`n` fully specified prompts over seen shapes, and what each should show.

    Example:
        >>> seen_prompt_set(1)[0]
        ['a blue checkered diamond in the bottom right']
    """
    combos = list(itertools.product(SEEN_SHAPES, COLORS, TEXTURES, POSITIONS))
    order = np.random.default_rng(seed).permutation(len(combos))
    picks = [combos[order[i % len(combos)]] for i in range(n)]
    prompts = [caption_from_parts(s, c, t, position=p) for s, c, t, p in picks]
    expected = [{"shape": s, "color": c, "texture": t, "position": p} for s, c, t, p in picks]
    return prompts, expected


def heldout_prompt_set(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """`n` prompts asking for a held-out shape, some with a colour; and the shape asked for."""
    rng = np.random.default_rng(seed + 1)
    prompts, shapes = [], []
    for i in range(n):
        shape = HELDOUT_SHAPES[i % len(HELDOUT_SHAPES)]
        color = list(COLORS)[rng.integers(len(COLORS))] if i % 4 else None
        prompts.append(caption_from_parts(shape, color))
        shapes.append(shape)
    return prompts, shapes


def report(
    pipe,
    n_images: int = 200,
    n_heldout: int = 40,
    n_paraphrase: int = 100,
    steps: int = 20,
    guidance_scale: float = 5.0,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Sample the fixed prompt sets and return accuracies (one JSON-able dict).

    `n_paraphrase` prompts each of the paraphrase and distractor sets (0 leaves them out).
    """

    def scored(prompts: list[str], expected: list[dict] | None = None):
        settings = SampleSettings(prompts=prompts, seeds=[seed], steps=steps, guidance_scale=guidance_scale,
                                  batch_size=50)
        return score(generate(pipe, settings, progress=progress), expected)

    table = scored(*seen_prompt_set(n_images, seed))
    accuracy = table.accuracy()
    held_prompts, held_shapes = heldout_prompt_set(n_heldout, seed)
    held_table = scored(held_prompts)
    heldout_hits = [row["shape"] == want for row, want in zip(held_table.rows, held_shapes)]
    free_phrasing = {}
    if n_paraphrase:
        for name, prompt_set in (("paraphrase", paraphrase_prompts), ("distractor", distractor_prompts)):
            free = scored(*prompt_set(n_paraphrase, seed)).accuracy()
            free_phrasing[f"{name}_shape_acc"] = round(free["shape"], 4)
            free_phrasing[f"{name}_color_acc"] = round(free["color"], 4)
    return {
        "shape_acc": round(accuracy["shape"], 4),
        "color_acc": round(accuracy["color"], 4),
        "texture_acc": round(accuracy["texture"], 4),
        "position_acc": round(accuracy["position"], 4),
        "heldout_shape_rate": round(float(np.mean(heldout_hits)), 4),
        "single_object_rate": round(table.rate("count", "1"), 4),
        **free_phrasing,
        "n_images": n_images,
        "n_heldout": n_heldout,
        "n_paraphrase": n_paraphrase,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
    }
