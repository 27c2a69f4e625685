"""RECE (Gong et al. 2024): closed-form concept erasure in the cross-attention, hardened against embeddings
that would bring the concept back.

Only the cross-attention key and value projections (`attn2.to_k`, `attn2.to_v`) of every transformer block
change; the text encoder and everything else stay as they were.

1. **UCE edit** (Gandikota et al. 2024), per projection W, in closed form:
   W' = (λ W + s_e Σ_e v_e c_eᵀ + s_p Σ_j W c_j c_jᵀ)(λ I + s_e Σ_e c_e c_eᵀ + s_p Σ_j c_j c_jᵀ)⁻¹
   where c_e runs over the token embeddings of each prompt naming an erased concept and v_e = W a_e sends them
   where W sends the same prompt with the concept replaced by its anchor, and c_j over the token embeddings of
   the kept prompts, left where W sends them (`studio.erasure.erase_prompts` makes both sets: on the toy model
   every ShapesWorld caption, elsewhere the concept in a few templates).
2. **Adversarial rounds** (`epochs`): the embedding that makes the edited projections W' produce what the
   original W⁰ produced for the concept, c' = (Σ W'ᵀW' + ρ I)⁻¹ (Σ W'ᵀ W⁰) c, summed over every edited
   projection (ρ = `regularization`), is erased by the same UCE step, applied to the edited weights.

The artifact is the difference W' − W⁰ of each edited projection (`rece_delta`), applied as W + scale·ΔW by
the plugin's default kind: it composes, fuses and comes off like any weight artifact.

Example:
    >>> from studio.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> deltas = erase(pipe, RECEConfig(concept=["dog"]), toy=False)
    >>> len(deltas), sorted(deltas)[0]
    (20, 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k')
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from studio.erasure import EraseOptions
from studio.errors import StudioError
from studio.options import ranged

TARGETS = ("attn2.to_k", "attn2.to_v")  # the cross-attention projections: where text enters the UNet


@dataclass
class RECEConfig(EraseOptions):
    """RECE options: the concepts, what they become and what is kept (`EraseOptions`), the closed form's weights."""

    lamb: float = ranged(0.1, 0, low_open=True)  # λ: how strongly every other input keeps its old output
    erase_scale: float = ranged(1.0, 0, low_open=True)  # s_e
    preserve_scale: float = ranged(0.1, 0)  # s_p
    epochs: int = ranged(1, 0, 100)  # adversarial rounds after the UCE edit (0: UCE alone)
    regularization: float = ranged(1e-3, 0, low_open=True)  # ρ of the adversarial embedding (the paper's λ for objects)


CONFIG = RECEConfig

DELTA = "rece_delta"
PARAMS = (DELTA,)
KEY_PREFIX = "unet."


def transform(weight: torch.Tensor, params: dict[str, torch.Tensor], scale: float = 1.0, config: dict | None = None) -> torch.Tensor:
    """W + scale·ΔW.

    Example:
        >>> transform(torch.zeros(1, 2), {DELTA: torch.ones(1, 2)}, scale=0.5).tolist()
        [[0.5, 0.5]]
    """
    return weight + scale * params[DELTA].to(weight)


def projections(unet: nn.Module) -> dict[str, nn.Linear]:
    """The cross-attention key and value projections of every transformer block, by module name.

    Example:
        >>> from studio.testing import tiny_sd_pipeline
        >>> sorted(projections(tiny_sd_pipeline().unet))[0]
        'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k'
    """
    found = {name: module for name, module in unet.named_modules() if name.endswith(TARGETS)}
    if not found:
        raise StudioError("this UNet has no cross-attention key/value projections (attn2.to_k / attn2.to_v): "
                          "RECE erases text concepts there, so it needs a text-conditioned UNet")
    for name, module in found.items():
        if not isinstance(module, nn.Linear):
            raise StudioError(f"{name} is a {type(module).__name__}, not a Linear: remove the adapter on it first")
    return found


def uce_map(erase: list[tuple[torch.Tensor, torch.Tensor]], preserve: list[torch.Tensor], lamb: float = 0.1,
            erase_scale: float = 1.0, preserve_scale: float = 0.1) -> torch.Tensor:
    """The input-side matrix T of one UCE edit, W' = W T, the same for every projection W (in x in, float64).

    `erase`: pairs (concept tokens, anchor tokens), each tokens x in: the concept's tokens are sent where W sends
    the anchor's. `preserve`: token matrices whose outputs stay. The closed form above, with W factored out:
    T = (λI + s_e Σ aᵀc + s_p Σ kᵀk)(λI + s_e Σ cᵀc + s_p Σ kᵀk)⁻¹. Float64: the inverse of a sum of outer
    products is ill-conditioned in float32.

    Example:
        >>> c = torch.tensor([[1.0, 0.0]]); anchor = torch.zeros(1, 2)
        >>> (torch.eye(2).double() @ uce_map([(c, anchor)], [], lamb=0.1)).diagonal().tolist()  # c now maps near 0
        [0.09090909090909091, 1.0]
    """
    dim = (erase[0][0] if erase else preserve[0]).shape[1]
    eye = torch.eye(dim, dtype=torch.float64)
    zeros = torch.zeros(0, dim, dtype=torch.float64)
    kept = torch.cat([k.double().cpu() for k in preserve]) if preserve else zeros
    concepts = torch.cat([c.double().cpu() for c, _ in erase]) if erase else zeros
    anchors = torch.cat([a.double().cpu() for _, a in erase]) if erase else zeros
    kept_gram = preserve_scale * kept.T @ kept
    towards = lamb * eye + erase_scale * anchors.T @ concepts + kept_gram
    inputs = lamb * eye + erase_scale * concepts.T @ concepts + kept_gram
    return torch.linalg.solve(inputs, towards, left=False)


def adversarial_embedding(gram: torch.Tensor, edit: torch.Tensor, concept: torch.Tensor, regularization: float) -> torch.Tensor:
    """The token embeddings that make the edited projections W' = W⁰ T (`edit` = T) output what the original W⁰
    output for `concept` (tokens x in), least squares over every projection: c' = (Σ W'ᵀW' + ρ I)⁻¹ (Σ W'ᵀ W⁰) c,
    with Σ W'ᵀW' = Tᵀ G T and Σ W'ᵀW⁰ = Tᵀ G from `gram` G = Σ W⁰ᵀW⁰ (so no edited weight is ever formed).

    Example:
        >>> T = torch.diag(torch.tensor([1.0, 0.5])).double()
        >>> adversarial_embedding(torch.eye(2).double(), T, torch.tensor([[1.0, 1.0]]), 1e-6).round(decimals=3)
        tensor([[1., 2.]])
    """
    dim = concept.shape[1]
    edited_gram = edit.T @ gram @ edit + regularization * torch.eye(dim, dtype=torch.float64)
    return (torch.linalg.solve(edited_gram, edit.T @ gram) @ concept.double().cpu().T).T.to(concept.dtype)


@torch.no_grad()
def encode(pipe, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """The UNet's text conditioning (N x tokens x cross-attention dim) for `prompts`, as the pipeline makes it."""
    chunks = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        chunks.append(pipe.encode_prompt(batch, device=pipe.text_encoder.device if pipe.text_encoder is not None
                                         else pipe.device, num_images_per_prompt=1,
                                         do_classifier_free_guidance=False)[0].float().cpu())
    return torch.cat(chunks)


@torch.no_grad()
def erase(pipe, config: RECEConfig, toy: bool) -> dict[str, torch.Tensor]:
    """RECE on `pipe`'s UNet, leaving it unchanged: the weight difference of every edited projection, by name.

    The UCE edit of the concepts in context (`studio.erasure.erase_prompts`), then `config.epochs` rounds that
    each erase the adversarial embedding of every concept (towards its anchor), preserving the kept prompts.
    """
    from studio.erasure import anchors, erase_prompts

    layers = projections(pipe.unet)
    pairs, kept_prompts = erase_prompts(config, toy)
    to = anchors(config, toy)
    concept_prompts = list(config.concept) + [to[c] for c in config.concept] if config.epochs else []
    # Every distinct prompt through the text encoder once, in one batched pass (most of RECE's time): the concepts
    # alone and their anchors are also the first erase pair.
    distinct = list(dict.fromkeys([p for pair in pairs for p in pair] + kept_prompts + concept_prompts))
    embedding = dict(zip(distinct, encode(pipe, distinct)))
    erase_pairs = [(embedding[prompt], embedding[anchor]) for prompt, anchor in pairs]
    kept = [embedding[prompt] for prompt in kept_prompts]
    scales = {"lamb": config.lamb, "erase_scale": config.erase_scale, "preserve_scale": config.preserve_scale}
    # Every projection is edited on its input side, W' = W T: the edits compose as matrices, and the weights are
    # touched once, at the end.
    edit = uce_map(erase_pairs, kept, **scales)

    if config.epochs:
        concepts = [embedding[prompt] for prompt in concept_prompts]
        n = len(config.concept)
        gram = sum(layer.weight.detach().double().cpu().T @ layer.weight.detach().double().cpu()
                   for layer in layers.values())
        for _ in range(config.epochs):
            adversarial = [adversarial_embedding(gram, edit, concepts[i], config.regularization) for i in range(n)]
            edit = edit @ uce_map([(adversarial[i], concepts[n + i]) for i in range(n)], kept, **scales)
    change = (edit - torch.eye(edit.shape[0], dtype=torch.float64)).float()
    return {name: (layer.weight.detach().float().cpu() @ change).to(layer.weight.dtype) for name, layer in layers.items()}
