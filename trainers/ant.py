"""How ANT is learned: from the model itself, no data (the reference's `train_ant_single.py`, on the loop contract).

Each step, with that step's seeded generators, a prompt c naming an erased concept (the erasures' shared prompts,
`studio.erasure.erase_prompts`: the concept alone and in context) and two depths are drawn: k⁺ among the first
`preserve_steps` DDIM steps and k⁻ among the rest. One DDIM trajectory of the model being trained, prompted with c
at `sampling_guidance`, gives the latents z⁺ after k⁺ steps and z⁻ after k⁻ steps (no gradient). With ε* the frozen
original model and ε_θ the trained one, each evaluated at the timestep its latent is at:

- early (z⁺): L_preserve = ‖ε_θ(z⁺, c) − [ε*(z⁺, ∅) + η(ε*(z⁺, c) − ε*(z⁺, ∅))]‖², the guidance direction kept;
- later (z⁻): L_erase = ‖ε_θ(z⁻, c) − [ε*(z⁻, ∅) − η(ε*(z⁻, c) − ε*(z⁻, ∅))]‖², the direction reversed;
- both: L_uncond = ‖ε_θ(z, ∅) − ε*(z, ∅)‖², the unconditional prediction kept (with its gradient: the reference
  computes it under no_grad, so there it trains nothing);
- L = L_erase + α₂ L_uncond⁻ + α₁ (L_preserve + α₂ L_uncond⁺).

The gradients are multiplied by the weight-saliency mask computed in `prepare`: the gradient of L at the original
weights for `saliency_prompts` prompts x `saliency_seeds` seeds, per tensor the most salient `saliency` share of
each, intersected (the reference keeps the least salient half, and evaluates z after k steps at the timestep of
step k counted from the end; both fixed here).

Several concepts take the multi-concept path (the reference's `Multiple/`; one concept too with `--refine`): `attach` adds a LoRA per concept
(`--lora-rank`, PEFT adapters `concept-0`, `concept-1`, ...) on the cross-attention key/value projections, the
only layers the refinement carries; each step draws a concept, switches its LoRA on and takes the objective on one
of that concept's own prompts (so each LoRA trains on about `--max-train-steps` / the number of concepts steps); the
artifact is the closed-form refinement of those projections (`studio.adapters.ant.refine`) from every concept's
prompts and LoRA and the kept prompts, written as the same sparse change (every entry of each projection).

Example:
    >>> from studio import registry
    >>> registry.get("ant").trainer.needs_data
    False
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from studio.trainers.base import Loop, MethodTrainer
from studio.trainers.trajectories import Conditioning, ddim_schedule, denoise

from studio.erasure import check_options, erase_prompts
from studio.errors import StudioError
from studio.pipeline import TOY_MODEL


class ANTTrainer(MethodTrainer):
    """The loop contract for ANT: no data; the trajectory-aware objective on the UNet's salient weights."""

    needs_data = False
    uses_prior_data = False

    def attach(self, pipe, method_config, train_text_encoder: bool = False) -> dict[str, list[str]]:
        check_options(method_config, pipe.tokenizer)
        if method_config.preserve_steps >= method_config.denoising_steps:
            raise StudioError(f"--preserve-steps {method_config.preserve_steps} leaves no step to erase in: it must be "
                              f"less than --denoising-steps ({method_config.denoising_steps})")
        self.concepts = list(method_config.concept)
        self.refining = len(self.concepts) > 1 or method_config.refine  # the multi-concept path
        pipe.unet.requires_grad_(False)
        if self.refining:
            return self._attach_concept_loras(pipe, method_config)
        layers = self.adapter.target_layers(pipe.unet)
        for layer in layers.values():
            layer.weight.requires_grad_(True)
        self.original = copy.deepcopy(pipe.unet).eval()  # ε*, frozen
        self.original_weights = {name: layer.weight.detach().clone() for name, layer in layers.items()}
        return {"unet": sorted(layers)}

    def _attach_concept_loras(self, pipe, method_config) -> dict[str, list[str]]:
        """The multi-concept path: a LoRA per concept on the cross-attention key/value projections, all trainable
        (each step switches one on; the others get no gradient, so Adam leaves them)."""
        from peft import LoraConfig

        from studio.adapters.lora import check_rank
        from studio.adapters.rece import projections

        layers = projections(pipe.unet)
        check_rank(pipe.unet, sorted(layers), method_config.lora_rank, "--lora-rank", retarget=False)
        self.original = copy.deepcopy(pipe.unet).eval()  # ε*, frozen
        self.original_weights = {name: layer.weight.detach().clone() for name, layer in layers.items()}
        lora = LoraConfig(r=method_config.lora_rank, lora_alpha=method_config.lora_rank, target_modules=sorted(layers))
        with warnings.catch_warnings():  # PEFT warns that a model gets several adapters: here that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            for k in range(len(self.concepts)):
                pipe.unet.add_adapter(lora, adapter_name=self._lora_name(k))
        for name, parameter in pipe.unet.named_parameters():
            if ".lora_" in name:
                parameter.requires_grad_(True)
        return {"unet": sorted(layers)}

    @staticmethod
    def _lora_name(k: int) -> str:
        return f"concept-{k}"

    def prepare(self, loop: Loop) -> None:
        pipe, config, device = loop.pipe, loop.method_config, loop.accelerator.device
        toy = loop.config.model == TOY_MODEL
        if self.refining:  # each concept's own prompts, one after the other
            per_concept = [[prompt for prompt, _ in erase_prompts(dataclasses.replace(config, concept=[c]), toy)[0]]
                           for c in self.concepts]
            texts = [prompt for prompts in per_concept for prompt in prompts]
            bounds = np.cumsum([0] + [len(prompts) for prompts in per_concept])
            self.concept_rows = [range(bounds[k], bounds[k + 1]) for k in range(len(self.concepts))]
            self.kept_prompts = erase_prompts(config, toy)[1]  # held in place by the refinement
        else:
            texts = [prompt for prompt, _ in erase_prompts(config, toy)[0]]
        self.prompts = Conditioning.encode(pipe, texts, device)
        self.empty = Conditioning.encode(pipe, [""], device)
        self.scheduler, self.latent_shape = ddim_schedule(pipe, config.denoising_steps, device)
        self.masks = self._saliency(loop) if config.saliency < 1 and not self.refining else {}
        unet = loop.unwrap("unet")
        for name, mask in self.masks.items():  # masked entries get no gradient, so Adam never moves them
            unet.get_submodule(name).weight.register_hook(lambda grad, mask=mask: grad * mask.to(grad.dtype))

    def _saliency(self, loop: Loop) -> dict[str, torch.Tensor]:
        """Per layer, the entries among the most salient share of |∇L| for every prompt augmentation and seed."""
        config, unet = loop.method_config, loop.unwrap("unet")
        rng = np.random.default_rng([loop.config.seed, 1_000_003])
        layers = self.adapter.target_layers(unet)
        gradients: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
        picks = rng.choice(len(self.prompts), size=min(config.saliency_prompts, len(self.prompts)), replace=False)
        for prompt in picks:
            for seed in range(config.saliency_seeds):
                generator = torch.Generator().manual_seed(int(rng.integers(2**31)) + seed)
                unet.zero_grad(set_to_none=True)
                self._objective(loop, int(prompt), rng, generator).backward()
                for name, layer in layers.items():
                    gradients[name].append(layer.weight.grad.detach().clone())
        unet.zero_grad(set_to_none=True)
        return {name: self.adapter.salient_mask(grads, config.saliency) for name, grads in gradients.items()}

    def _objective(self, loop: Loop, prompt: int, rng: np.random.Generator, generator: torch.Generator) -> torch.Tensor:
        config = loop.method_config
        unet = loop.models["unet"]
        device = loop.accelerator.device
        concept = self.prompts.rows([prompt])
        early = int(rng.integers(0, config.preserve_steps)) if config.preserve_steps else None
        late = int(rng.integers(config.preserve_steps, config.denoising_steps))
        # One trajectory of the trained model for c: z⁺ after `early` steps, z⁻ after `late`.
        x = torch.randn(self.latent_shape, generator=generator).to(device) * self.scheduler.init_noise_sigma
        latents = []
        reached = 0
        for step in [s for s in (early, late) if s is not None]:
            x = denoise(unet, self.scheduler, x, concept, self.empty, config.sampling_guidance, reached, step)
            latents.append(x)
            reached = step
        z = torch.cat(latents)
        t = torch.stack([self.scheduler.timesteps[s] for s in (early, late) if s is not None]).to(device)
        n = len(z)
        with torch.no_grad():  # ε*: the original model, unconditional and with the concept
            e_empty, e_concept = Conditioning.cat(self.empty.repeat(n), concept.repeat(n)).predict(
                self.original, torch.cat([z, z]), torch.cat([t, t])).chunk(2)
        n_concept, n_empty = Conditioning.cat(concept.repeat(n), self.empty.repeat(n)).predict(
            unet, torch.cat([z, z]), torch.cat([t, t])).chunk(2)
        sign = torch.tensor([1.0, -1.0] if early is not None else [-1.0], device=device).view(-1, 1, 1, 1)
        target = e_empty + sign * config.guidance * (e_concept - e_empty)  # kept early, reversed later
        per_step = [F.mse_loss(n_concept[i], target[i]) + config.uncond_weight * F.mse_loss(n_empty[i], e_empty[i])
                    for i in range(n)]
        return per_step[-1] + (config.early_weight * per_step[0] if early is not None else 0.0)

    def loss(self, loop: Loop, rng: np.random.Generator, generator: torch.Generator) -> torch.Tensor:
        if not self.refining:
            return self._objective(loop, int(rng.integers(len(self.prompts))), rng, generator)
        k = int(rng.integers(len(self.concepts)))
        loop.unwrap("unet").set_adapter(self._lora_name(k))
        rows = self.concept_rows[k]
        return self._objective(loop, rows[int(rng.integers(len(rows)))], rng, generator)

    def artifact(self, loop: Loop) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        unet = loop.unwrap("unet")
        weights = self._refined(loop) if self.refining else {
            name: unet.get_submodule(name).weight for name in self.original_weights}
        tensors = {}
        for name, original in self.original_weights.items():
            change = self.adapter.sparse_change(original, weights[name])
            if change[self.adapter.INDICES].numel():
                for param, value in change.items():
                    tensors[f"{self.adapter.KEY_PREFIX}{name}.{param}"] = value
        return tensors, {}

    @torch.no_grad()
    def _refined(self, loop: Loop) -> dict[str, torch.Tensor]:
        """The multi-concept path's projections: every concept's LoRA fused by the closed-form refinement, from the
        concept's prompts (every token, as `prepare` encoded them) and the kept prompts (encoded as RECE encodes them)."""
        from studio.adapters.rece import encode

        config, unet = loop.method_config, loop.unwrap("unet")
        cross_dim = next(iter(self.original_weights.values())).shape[1]
        grams = []
        for rows in self.concept_rows:
            tokens = self.prompts.text[rows.start:rows.stop].reshape(-1, cross_dim).double().cpu()
            grams.append(tokens.T @ tokens)
        kept = encode(loop.pipe, self.kept_prompts).reshape(-1, cross_dim)
        inverse = self.adapter.refinement_inverse(grams, kept, config.lamb, config.preserve_scale)
        refined = {}
        for name, original in self.original_weights.items():
            layer = unet.get_submodule(name)
            deltas = [layer.get_delta_weight(self._lora_name(k)) for k in range(len(self.concepts))]
            refined[name] = self.adapter.refine(original, deltas, grams, inverse, config.fuse_scale)
        return refined
