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

Example:
    >>> from studio import registry
    >>> registry.get("ant").trainer.needs_data
    False
"""

from __future__ import annotations

import copy

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
        layers = self.adapter.target_layers(pipe.unet)
        pipe.unet.requires_grad_(False)
        for layer in layers.values():
            layer.weight.requires_grad_(True)
        self.original = copy.deepcopy(pipe.unet).eval()  # ε*, frozen
        self.original_weights = {name: layer.weight.detach().clone() for name, layer in layers.items()}
        return {"unet": sorted(layers)}

    def prepare(self, loop: Loop) -> None:
        pipe, config, device = loop.pipe, loop.method_config, loop.accelerator.device
        pairs, _ = erase_prompts(config, toy=loop.config.model == TOY_MODEL)
        self.prompts = Conditioning.encode(pipe, [prompt for prompt, _ in pairs], device)
        self.empty = Conditioning.encode(pipe, [""], device)
        self.scheduler, self.latent_shape = ddim_schedule(pipe, config.denoising_steps, device)
        self.masks = self._saliency(loop) if config.saliency < 1 else {}
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
        return self._objective(loop, int(rng.integers(len(self.prompts))), rng, generator)

    def artifact(self, loop: Loop) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        unet = loop.unwrap("unet")
        tensors = {}
        for name, original in self.original_weights.items():
            change = self.adapter.sparse_change(original, unet.get_submodule(name).weight)
            if change[self.adapter.INDICES].numel():
                for param, value in change.items():
                    tensors[f"{self.adapter.KEY_PREFIX}{name}.{param}"] = value
        return tensors, {}
