"""How SPM is learned: from the model itself, no data (the reference's `train_spm.py`, on the loop contract).

Each step, with that step's seeded generators:
1. a prompt c naming an erased concept, with its neutral twin n, and a depth k in [1, denoising_steps) are drawn; a
   latent x_t is sampled by DDIM from noise for k steps with the membranes on, prompted with c at `sampling_guidance`
   (no gradient). The prompts are the erasures' shared set (`studio.erasure.erase_prompts`): the concept alone and in
   context (on the toy model every caption naming it), n the same prompt with the concept replaced by its anchor
   (`--anchor`; the reference's neutral prompt is empty). The reference trains on the concept word alone; on the toy
   model a membrane trained so erased "circle" but not "a red striped circle" (the toy text encoder carries a word's
   meaning in the tokens after it, which change with the context);
2. the erase loss ‖ε_{θ+Δ}(x_t, c) − [ε_θ(x_t, n) − η(ε_θ(x_t, c) − ε_θ(x_t, n))]‖², ε_θ with the membranes off;
3. Latent Anchoring: `anchors_per_step` random embeddings e, each a Gaussian direction accepted with probability
   1 − cos(e, c) and scaled to 0.8-1.2 × ‖c‖, and ‖ε_{θ+Δ}(x_t, e) − ε_θ(x_t, e)‖² weighted by `anchor_weight`: the
   membranes must leave the model's answer to everything else as it was.

Example:
    >>> from studio import registry
    >>> registry.get("spm").trainer.needs_data
    False
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from studio.trainers.base import Loop, MethodTrainer
from studio.trainers.trajectories import Conditioning, ddim_schedule, denoise

from studio.erasure import check_options, erase_prompts
from studio.pipeline import TOY_MODEL

ANCHOR_SCALE = (0.8, 1.2)  # an anchor embedding's norm, relative to the concept's (the reference's range)


class SPMTrainer(MethodTrainer):
    """The loop contract for SPM: no data; the erase loss with Latent Anchoring on DDIM latents of the model itself."""

    needs_data = False
    uses_prior_data = False

    def attach(self, pipe, method_config, train_text_encoder: bool = False) -> dict[str, list[str]]:
        check_options(method_config, pipe.tokenizer)
        return {"unet": self.adapter.inject(pipe.unet, method_config)}

    @torch.no_grad()
    def prepare(self, loop: Loop) -> None:
        pipe, config = loop.pipe, loop.method_config
        pairs, _ = erase_prompts(config, toy=loop.config.model == TOY_MODEL)
        device = loop.accelerator.device
        self.concepts = Conditioning.encode(pipe, [prompt for prompt, _ in pairs], device)
        self.neutrals = Conditioning.encode(pipe, [twin for _, twin in pairs], device)
        self.empty = Conditioning.encode(pipe, [""], device)
        self.scheduler, self.latent_shape = ddim_schedule(pipe, config.denoising_steps, device)

    @staticmethod
    def _anchor_embeddings(concept: Conditioning, count: int, rng: np.random.Generator,
                           generator: torch.Generator) -> Conditioning:
        """Random embeddings away from the concept's: Gaussian directions accepted with probability 1 − cos(e, c),
        scaled to 0.8-1.2 x the concept's norm (text conditioning and, on SDXL, the pooled embedding alike)."""
        made = []
        for part in (concept.text, concept.pooled):
            if part is None:
                made.append(None)
                continue
            target = part[0].flatten()
            samples = []
            while len(samples) < count:
                noise = torch.randn(target.shape, generator=generator).to(target)
                noise = noise / noise.norm()
                if rng.random() < 1 - float(F.cosine_similarity(target, noise, dim=0)):
                    scale = rng.uniform(*ANCHOR_SCALE) * float(target.norm())
                    samples.append((noise * scale).view(part.shape[1:]))
            made.append(torch.stack(samples))
        return Conditioning(made[0], made[1], concept.time_ids)

    def loss(self, loop: Loop, rng: np.random.Generator, generator: torch.Generator) -> torch.Tensor:
        config = loop.method_config
        unet = loop.models["unet"]
        membranes_on = loop.unwrap("unet")
        pick = [int(rng.integers(len(self.concepts)))]
        concept, neutral = self.concepts.rows(pick), self.neutrals.rows(pick)
        depth = int(rng.integers(1, config.denoising_steps))
        device = loop.accelerator.device
        # 1. a latent along the model's own trajectory for the concept, membranes on
        x = torch.randn(self.latent_shape, generator=generator).to(device) * self.scheduler.init_noise_sigma
        x = denoise(unet, self.scheduler, x, concept, self.empty, config.sampling_guidance, 0, depth)
        t = self.scheduler.timesteps[depth]
        count = config.anchors_per_step
        with torch.no_grad():  # the model without the membranes: the targets
            self.adapter.set_membranes(membranes_on, False)
            positive = concept.predict(unet, x, t)
            neutral_eps = neutral.predict(unet, x, t)
            anchored = self._anchor_embeddings(concept, count, rng, generator) if count else None
            anchored_base = anchored.predict(unet, x.repeat(count, 1, 1, 1), t) if anchored else None
            self.adapter.set_membranes(membranes_on, True)
        # 2. the erase loss: the concept's prediction pushed to the neutral one, away from the concept
        target = neutral_eps - config.guidance * (positive - neutral_eps)
        loss = F.mse_loss(concept.predict(unet, x, t), target)
        if anchored is not None:  # 3. Latent Anchoring: everything else answered as before
            loss = loss + config.anchor_weight * F.mse_loss(anchored.predict(unet, x.repeat(count, 1, 1, 1), t),
                                                            anchored_base)
        return loss

    def artifact(self, loop: Loop) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return self.adapter.state_dict(loop.unwrap("unet")), self.adapter.file_metadata(loop.method_config)
