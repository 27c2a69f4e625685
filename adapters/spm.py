"""SPM (Lyu et al. 2024): a one-dimensional "semi-permeable membrane" that erases a concept.

- **Membrane**: on every Linear/Conv2d inside the UNet's transformer blocks (`proj_in`/`proj_out`, attention
  q/k/v/out, feed-forward), h = W x + (α/r) U(D x) with rank r = 1 by default: D is the layer's own kind (a
  convolution keeps the kernel), U a 1x1 projection, zero-initialised so a fresh membrane changes nothing. It is a
  forward hook on the plain layer (the layer keeps its class and keys, so diffusers' and PEFT's loaders still see it).
- **Facilitated Transport** (inference): each membrane's strength follows the prompt p: γ(p) = max over the erased
  concepts c of max(cos(E(p), E(c)), |tok(p) ∩ tok(c)| / |tok(c)|), E the UNet's text conditioning (flattened), tok
  the prompt's tokens without the special ones. As in the reference code, both factors are scaled by γ, so the update
  scales by γ²: prompts unrelated to the concept pass nearly untouched. Several SPMs each gate themselves and add.
  One addition to the reference: a prompt naming the concept by a synonym also opens the membrane fully. The
  reference's token overlap counts only the concept's own tokens, and the whole-prompt cosine of "a red disk" with
  "circle" stays near the unrelated prompts' (the toy model: 0.57-0.75 against up to 0.45; benchmarks/spm_transport.py),
  so the membrane opened to γ² ≈ 0.4 and half the synonym prompts still drew the concept. Here γ = 1 also when a phrase of the prompt (one to
  three words) encodes like the concept: the cosine of E(phrase) − E("") and E(c) − E("") is at least
  `synonym_threshold` (default 0.9; on the toy model "disk" and "round shape" reach 0.97-0.99 with "circle",
  "stripy" 1.00 with "striped", while the nearest other word, "square", is at 0.70); at 1 only phrases that encode
  exactly as the concept does (its own word) count.
- The artifact: per layer `spm_down` (r x in[ x k x k]) and `spm_up` (out x r, with α/r folded in), the concepts in
  the header. `studio convert --to kohya` writes the official key layout (`lora_unet_<path>.lora_down.weight`,
  `.lora_up.weight`, `.alpha`, metadata `prompts`, `rank`, `alpha`), which loads as a plain LoRA (without transport)
  in diffusers' `load_lora_weights` and in SD web UIs.

How it is learned (the erase loss with Latent Anchoring) is `trainers/spm.py`.

Example:
    >>> layer = torch.nn.Linear(8, 4)
    >>> membrane = Membrane(layer, rank=1, alpha=1.0)
    >>> x = torch.randn(2, 8)
    >>> torch.equal(membrane(x), torch.zeros(2, 4))  # zero-initialised: a fresh membrane changes nothing
    True
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from studio.erasure import EraseOptions
from studio.errors import StudioError
from studio.options import ranged

MEMBRANE = "spm_membrane"  # the child module name a membrane trains under
DOWN, UP = "spm_down", "spm_up"
PARAMS = (DOWN, UP)
KEY_PREFIX = "unet."
TRANSFORMER_CLASSES = ("Transformer2DModel", "SD3Transformer2DModel")
CONVERTS_TO = ("kohya",)  # `studio convert --to kohya`: the official SPM file
CONVERTS_TO_WHY = "the official SPM layout, which diffusers' load_lora_weights and SD web UIs load as a plain LoRA"


@dataclass
class SPMConfig(EraseOptions):
    """SPM options: the concepts and what they become (`EraseOptions`: `--anchor` is the erase loss's neutral prompt),
    the membrane's rank, the erase loss and Latent Anchoring, the sampling of the training latents, the transport."""

    rank: int = ranged(1, 1, 64)  # one dimension: the paper's membrane
    alpha: float = ranged(1.0, 0, low_open=True)
    guidance: float = ranged(1.0, 0)  # η of the erase target ε(x, neutral) − η (ε(x, c) − ε(x, neutral))
    # Latent Anchoring's weight. The paper's 1000 (for SD1.x; "retune per model") kept the toy model's membranes from
    # erasing (300 steps: erase_rate 0.94 on 32 prompts); 10 erased (0.00) with preservation -0.005.
    anchor_weight: float = ranged(10.0, 0)
    anchors_per_step: int = ranged(4, 0, 64)  # random anchor embeddings per step (0: no Latent Anchoring)
    denoising_steps: int = ranged(30, 2, 1000)  # DDIM steps of the trajectories the training latents come from
    sampling_guidance: float = ranged(3.0, 0, 100)  # classifier-free guidance along those trajectories
    transport: bool = True  # Facilitated Transport when applied (off: full strength for every prompt)
    # a prompt phrase encoding like the concept at this cosine or more opens the membrane fully (1: its own word only)
    synonym_threshold: float = ranged(0.9, 0, 1, low_open=True)


CONFIG = SPMConfig


def target_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """Every Linear/Conv2d inside the UNet's transformer blocks, by module name.

    Example:
        >>> from studio.testing import tiny_sd_pipeline
        >>> sorted(target_layers(tiny_sd_pipeline().unet))[0]
        'down_blocks.0.attentions.0.proj_in'
    """
    found = {}
    for name, block in unet.named_modules():
        if type(block).__name__ in TRANSFORMER_CLASSES:
            for inner, module in block.named_modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)) and inner:
                    found[f"{name}.{inner}"] = module
    if not found:
        raise StudioError("this UNet has no transformer blocks: SPM's membranes go on the Linear/Conv2d layers inside "
                          "them (attention, projections, feed-forward)")
    return found


class Membrane(nn.Module):
    """The trainable rank-r update of one layer: x -> (α/r) U(D x), D of the layer's kind, U zero-initialised."""

    def __init__(self, layer: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        if isinstance(layer, nn.Conv2d):
            rank = min(rank, layer.in_channels, layer.out_channels)
            self.down = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, bias=False)
            self.up = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
        else:
            rank = min(rank, layer.in_features, layer.out_features)
            self.down = nn.Linear(layer.in_features, rank, bias=False)
            self.up = nn.Linear(rank, layer.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.scale = alpha / rank
        self.enabled = True
        self.to(layer.weight.device, layer.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * self.scale

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up as the file stores it: out x r, with α/r folded in)."""
        up = self.up.weight.detach().flatten(1) * self.scale
        return self.down.weight.detach().clone(), up.clone()


def _add_membrane(module: nn.Module, inputs, output):
    membrane = getattr(module, MEMBRANE)
    return output + membrane(inputs[0]) if membrane.enabled else output


def inject(unet: nn.Module, config: SPMConfig) -> list[str]:
    """Put a fresh membrane on every target layer of `unet` (a child module `spm_membrane` and a forward hook), freeze
    everything else; the wrapped layer names.

    Example:
        >>> from studio.testing import tiny_sd_pipeline
        >>> unet = tiny_sd_pipeline().unet
        >>> names = inject(unet, SPMConfig(concept=["dog"]))
        >>> sum(p.numel() for p in unet.parameters() if p.requires_grad) > 0
        True
    """
    layers = target_layers(unet)
    unet.requires_grad_(False)
    for layer in layers.values():
        layer.add_module(MEMBRANE, Membrane(layer, config.rank, config.alpha))
        layer.register_forward_hook(_add_membrane)
    return sorted(layers)


def membranes(unet: nn.Module) -> dict[str, Membrane]:
    """The membranes `inject` put on `unet`, by layer name."""
    return {name[: -len(MEMBRANE) - 1]: m for name, m in unet.named_modules() if isinstance(m, Membrane)}


def set_membranes(unet: nn.Module, enabled: bool) -> None:
    """Switch every membrane on `unet` on or off (training compares the model with and without them)."""
    for membrane in membranes(unet).values():
        membrane.enabled = enabled


def state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The file's tensors: per layer `spm_down` and `spm_up` (α/r folded in)."""
    tensors = {}
    for name, membrane in membranes(unet).items():
        down, up = membrane.factors()
        tensors[f"{KEY_PREFIX}{name}.{DOWN}"], tensors[f"{KEY_PREFIX}{name}.{UP}"] = down, up
    return tensors


def file_metadata(config: SPMConfig) -> dict[str, str]:
    """The official file's header entries (erased prompts, rank, alpha), also in ours."""
    return {"prompts": ",".join(config.concept), "rank": str(config.rank), "alpha": str(config.alpha)}


def delta(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The dense weight update up @ down, shaped like the layer's weight.

    Example:
        >>> delta(torch.ones(1, 3), torch.ones(2, 1)).shape
        torch.Size([2, 3])
    """
    return (up.float() @ down.flatten(1).float()).reshape(up.shape[0], *down.shape[1:])


# ----------------------------------------------------------------------------- attaching (Facilitated Transport)

class MembraneHook:
    """A forward hook on one plain layer adding its membrane's update times the current per-sample gates."""

    def __init__(self, layer: nn.Module, down: torch.Tensor, up: torch.Tensor, attachment: SPMAttachment) -> None:
        self.layer, self.attachment = layer, attachment
        self.down = down.to(layer.weight.device, layer.weight.dtype)
        self.up = up.to(layer.weight.device, layer.weight.dtype)
        self.handle = layer.register_forward_hook(self)

    def __call__(self, module: nn.Module, inputs, output):
        gates = self.attachment.batch_gates(output.shape[0], output.device, output.dtype)
        if gates is None:
            return output
        x = inputs[0]
        if isinstance(module, nn.Conv2d):
            low = F.conv2d(x, self.down, None, module.stride, module.padding, module.dilation)
            update = F.conv2d(low, self.up[:, :, None, None])
            return output + update * gates.view(-1, 1, 1, 1)
        update = F.linear(F.linear(x, self.down), self.up)
        return output + update * gates.view(-1, *([1] * (update.dim() - 1)))


class SPMAttachment:
    """An applied SPM: a membrane hook on each target layer and the gates Facilitated Transport sets per prompt.

    `set_prompts(prompts)` (through `studio.plugin.set_prompts`, which `studio sample` and the web app call before each
    pipeline call) computes γ² for each prompt; the UNet's batch is those prompts, or twice them under classifier-free
    guidance (the negative prompt's half gets its prompt's gate, as the reference's per-call multiplier does). Without
    prompts (a direct `pipe(...)` call) every sample gets the full strength, as the official file gives as a plain LoRA.
    """

    def __init__(self, pipe, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], concepts: list[str],
                 transport: bool, scale: float, name: str, synonym_threshold: float = SPMConfig.synonym_threshold) -> None:
        self.pipe, self.name, self.method = pipe, name, "spm"
        self.scale, self.enabled, self.transport, self.concepts = scale, True, transport, concepts
        self.synonym_threshold = synonym_threshold
        self.phrase_similarity: dict[str, torch.Tensor] = {}  # phrase -> cosine with each concept, kept across calls
        self.prompt_gates: torch.Tensor | None = None  # γ² per prompt of the coming call
        self.hooks: list[MembraneHook] = []
        try:
            for layer_name, (down, up) in factors.items():
                self.hooks.append(MembraneHook(pipe.unet.get_submodule(layer_name), down, up, self))
        except BaseException:
            self.remove()
            raise
        self.touched = sorted(factors)

    @property
    def layers(self) -> list[str]:
        return [f"unet.{name}" for name in self.touched]

    def set_scale(self, scale: float) -> None:
        self.scale = scale

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled

    def remove(self) -> None:
        for hook in self.hooks:
            hook.handle.remove()
        self.hooks = []

    def call_inputs(self, **_) -> dict:
        return {}

    def set_prompts(self, prompts: list[str] | None) -> None:
        """Set each prompt's gate for the coming call (Facilitated Transport); None: full strength for every sample."""
        if prompts is None or not self.transport:
            self.prompt_gates = None
        else:
            self.prompt_gates = transport_gates(self.pipe, prompts, self.concepts, self.synonym_threshold,
                                                self.phrase_similarity) ** 2
        return {}

    def batch_gates(self, batch: int, device, dtype) -> torch.Tensor | None:
        if not self.enabled or self.scale == 0:
            return None
        gates = self.prompt_gates
        if gates is None:
            return torch.full((batch,), self.scale, device=device, dtype=dtype)
        if batch not in (len(gates), 2 * len(gates)):  # the images, or their negative half then their positive half
            raise StudioError(f"SPM {self.name}: the UNet got a batch of {batch} for {len(gates)} prompts; give "
                              "studio.plugin.set_prompts(pipe, prompts) one prompt per image of the coming call")
        return (gates.repeat(batch // len(gates)) * self.scale).to(device, dtype)


SYNONYM_PHRASE_WORDS = 3  # the longest prompt phrase compared with a concept ("round shape" for "circle")


@torch.no_grad()
def transport_gates(pipe, prompts: list[str], concepts: list[str], synonym_threshold: float = SPMConfig.synonym_threshold,
                    phrase_similarity: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """γ(p) per prompt: the highest, over `concepts`, of the cosine of the flattened text conditionings and the
    share of the concept's tokens in the prompt (special tokens left out); 1 where a phrase of the prompt encodes
    like the concept (`synonym_phrases`, with `phrase_similarity` as its memo for these concepts).

    Example:
        >>> from studio.pipeline import load
        >>> [round(g, 2) for g in transport_gates(load("toy"), ["a red circle", "a red disk", "a red square"], ["circle"]).tolist()]
        [1.0, 1.0, 0.52]
    """
    def encoded(texts: list[str]) -> torch.Tensor:
        return pipe.encode_prompt(texts, device=pipe.device, num_images_per_prompt=1,
                                  do_classifier_free_guidance=False)[0].float().flatten(1)

    tokenizer = pipe.tokenizer
    special = set(tokenizer.all_special_ids)

    def tokens(text: str) -> set[int]:
        return set(tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids) - special

    cosine = F.cosine_similarity(encoded(prompts)[:, None], encoded(concepts)[None], dim=-1).clamp(min=0)
    overlap = torch.tensor([[len(tokens(p) & tokens(c)) / max(1, len(tokens(c))) for c in concepts] for p in prompts],
                           device=cosine.device)
    synonyms = synonym_phrases(encoded, prompts, concepts, synonym_threshold, phrase_similarity).to(cosine.device)
    return torch.maximum(torch.maximum(cosine, overlap), synonyms).max(dim=1).values.clamp(max=1.0).cpu()


def synonym_phrases(encoded, prompts: list[str], concepts: list[str], threshold: float,
                    memo: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """1 where prompt p has a phrase of one to `SYNONYM_PHRASE_WORDS` words whose text encoding, less the empty
    prompt's, has a cosine of at least `threshold` with concept c's (so encoded alike: "disk" for "circle"), else 0;
    a (prompts x concepts) tensor. `encoded` maps texts to flattened text conditionings; the distinct phrases of
    all prompts go through it in one batch (a 29-word prompt has 84). `memo` (phrase -> its cosines with these
    `concepts`) keeps them for the next call, so a prompt drawn again costs no encoding (an SPM attachment keeps one:
    an SD1.5-sized text encoder on a CPU takes seconds for a long prompt's phrases).

    Example:
        >>> from studio.pipeline import load
        >>> pipe = load("toy")
        >>> encoded = lambda texts: pipe.encode_prompt(texts, "cpu", 1, False)[0].flatten(1)
        >>> synonym_phrases(encoded, ["a round shape", "a square"], ["circle"], 0.9).tolist()
        [[1.0], [0.0]]
    """
    phrases_of = []
    for prompt in prompts:
        words = re.findall(r"[^\s,.;:!?()\[\]{}\"]+", prompt)  # punctuation and prompt weighting apart
        phrases_of.append({" ".join(words[i:i + n]) for n in range(1, SYNONYM_PHRASE_WORDS + 1)
                           for i in range(len(words) - n + 1)})
    memo = {} if memo is None else memo
    new = sorted(set().union(*phrases_of) - memo.keys())
    if new:
        empty = encoded([""])

        def centred(texts: list[str]) -> torch.Tensor:
            return F.normalize(encoded(texts) - empty, dim=-1)

        memo.update(zip(new, (centred(new) @ centred(concepts).T).cpu()))
    matched = torch.zeros(len(prompts), len(concepts))
    for row, own in enumerate(phrases_of):
        if own:
            best = torch.stack([memo[phrase] for phrase in own]).max(dim=0).values
            matched[row] = (best >= threshold - 1e-6).float()
    return matched


def attach(pipe, tensors: dict[str, torch.Tensor], path: Path, scale: float, name: str) -> SPMAttachment:
    """Put an SPM file on `pipe`: check every layer first (it exists, is a Linear/Conv2d of the factors' shapes), then
    hook them all; a failure while hooking undoes what was hooked."""
    from studio.artifact import read_header

    header = read_header(path)
    concepts = header.config.get("concept") or []
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(KEY_PREFIX) or not key.endswith((f".{DOWN}", f".{UP}")):
            raise StudioError(f"{path}: unexpected tensor {key!r} in an SPM file")
        layer_name, _, param = key[len(KEY_PREFIX):].rpartition(".")
        down, up = factors.get(layer_name, (None, None))
        factors[layer_name] = (value, up) if param == DOWN else (down, value)
    for layer_name, (down, up) in factors.items():
        try:
            layer = pipe.unet.get_submodule(layer_name)
        except AttributeError:
            raise StudioError(f"{path}: the UNet has no layer {layer_name}; the file was made for another model") from None
        if down is None or up is None or not isinstance(layer, (nn.Linear, nn.Conv2d)) or \
                delta(down, up).shape != layer.weight.shape:
            raise StudioError(f"{path}: layer {layer_name} does not fit this UNet ({type(layer).__name__} "
                              f"{tuple(layer.weight.shape)}); the file was made for another model")
    return SPMAttachment(pipe, factors, concepts, bool(header.config.get("transport", True)), scale, name,
                         float(header.config.get("synonym_threshold", SPMConfig.synonym_threshold)))
