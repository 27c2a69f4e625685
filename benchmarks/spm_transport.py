"""Why SPM's Facilitated Transport let synonyms through, and what the synonym gate changes: the gates alone.

For each of the bench's concepts (circle, red, striped) this computes, on the toy model's text encoder (no UNet, no
sampling), the gate γ of three kinds of prompts, as `studio bench erase` writes them:
- `concept`: captions naming the concept by its own word;
- `synonym`: the same captions naming it by a synonym or paraphrase (`studio.bench.erase.SYNONYMS`);
- `other`: full captions naming none of the concept's values (the bench's preservation prompts);
under the reference's gate (`synonym_threshold` above 1: the whole-prompt cosine and the token overlap only) and
ours (the default threshold 0.9). It also lists the cosine, each less the empty prompt's encoding, of every synonym
and of every other word of the concept's kind with the concept: what `--synonym-threshold` separates. One JSON
object; min / mean / max per kind of prompt.

    python benchmarks/spm_transport.py --output benchmarks/results/spm-transport.json   # seconds
"""

from __future__ import annotations

import argparse

import torch

from studio.adapters.spm import SPMConfig, synonym_phrases, transport_gates
from studio.bench.erase import CONCEPTS, SYNONYMS, VALUES, concept_prompts, other_prompts
from studio.cli import print_result
from studio.pipeline import load

PROMPTS = 32  # per kind of prompt (the synonyms share them)
REFERENCE = 1.5  # a threshold no cosine reaches: the reference's gate


def summary(gates: torch.Tensor) -> dict:
    return {"min": round(float(gates.min()), 3), "mean": round(float(gates.mean()), 3), "max": round(float(gates.max()), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="also write the JSON here")
    parser.set_defaults(json=True)  # for print_result: the JSON, on one line
    args = parser.parse_args()
    pipe = load("toy")

    def encoded(texts: list[str]) -> torch.Tensor:
        return pipe.encode_prompt(texts, device="cpu", num_images_per_prompt=1,
                                  do_classifier_free_guidance=False)[0].float().flatten(1)

    result: dict = {"threshold": SPMConfig.synonym_threshold, "prompts_per_kind": PROMPTS, "concepts": {}}
    for concept in CONCEPTS:
        synonyms = SYNONYMS[concept]
        kinds = {"concept": concept_prompts(concept, [concept], PROMPTS, seed=0),
                 "synonym": [p for name in synonyms for p in concept_prompts(concept, [concept], PROMPTS // len(synonyms),
                                                                              seed=1, name=name)],
                 "other": other_prompts([concept], PROMPTS, seed=2)[0]}
        gates = {}
        for label, threshold in (("reference", REFERENCE), ("ours", SPMConfig.synonym_threshold)):
            gates[label] = {kind: summary(transport_gates(pipe, prompts, [concept], threshold))
                            for kind, prompts in kinds.items()}
        words = synonyms + [v for v in VALUES[CONCEPTS[concept]] if v != concept]
        cosines: dict[str, torch.Tensor] = {}  # the gate's own measure: each phrase's cosine with the concept
        synonym_phrases(encoded, words, [concept], SPMConfig.synonym_threshold, cosines)
        result["concepts"][concept] = {"gates": gates,
                                       "cosine_with_concept": {w: round(float(cosines[w][0]), 3) for w in words}}
    print_result(result, args)


if __name__ == "__main__":
    main()
