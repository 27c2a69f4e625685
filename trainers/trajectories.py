"""What the trainers that learn from the model's own trajectories share (SPM, ANT): prompts as the UNet takes them,
on SD and SDXL alike, and DDIM denoising with classifier-free guidance over a range of steps.

Example:
    >>> from studio.testing import tiny_sdxl_pipeline
    >>> pipe = tiny_sdxl_pipeline()
    >>> prompts = Conditioning.encode(pipe, ["a dog", ""], "cpu")
    >>> len(prompts), prompts.pooled is not None
    (2, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from studio.pipeline import default_size


@dataclass
class Conditioning:
    """Per prompt the UNet's text conditioning and, on SDXL, the pooled embedding (with the size ids it needs)."""

    text: torch.Tensor  # N x tokens x cross-attention dim
    pooled: torch.Tensor | None  # N x pooled dim (SDXL), else None
    time_ids: torch.Tensor | None  # 1 x 6: (height, width, 0, 0, height, width) of the model's own size (SDXL)

    @classmethod
    @torch.no_grad()
    def encode(cls, pipe, prompts: list[str], device) -> Conditioning:
        """`prompts` encoded as the pipeline encodes them."""
        encoded = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        if len(encoded) == 4:  # SDXL: (embeds, negative, pooled, negative pooled)
            width, height = default_size(pipe)
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32, device=device)
            return cls(encoded[0].float(), encoded[2].float(), time_ids)
        return cls(encoded[0].float(), None, None)

    def __len__(self) -> int:
        return len(self.text)

    def rows(self, index) -> Conditioning:
        """The prompts at `index` (a list of positions, or a slice)."""
        return Conditioning(self.text[index], self.pooled[index] if self.pooled is not None else None, self.time_ids)

    def repeat(self, n: int) -> Conditioning:
        """Each prompt n times in a row (for a batch of n latents per prompt)."""
        return Conditioning(self.text.repeat_interleave(n, 0),
                            self.pooled.repeat_interleave(n, 0) if self.pooled is not None else None, self.time_ids)

    @staticmethod
    def cat(*parts: Conditioning) -> Conditioning:
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return Conditioning(torch.cat([p.text for p in parts]), pooled, parts[0].time_ids)

    def predict(self, unet, x: torch.Tensor, t) -> torch.Tensor:
        """The UNet's prediction for latents `x` (one per prompt) at timestep(s) `t`, in float32."""
        added = None
        if self.pooled is not None:
            added = {"text_embeds": self.pooled, "time_ids": self.time_ids.expand(len(x), -1)}
        return unet(x, t, self.text, added_cond_kwargs=added).sample.float()


def ddim_schedule(pipe, steps: int, device) -> tuple:
    """The DDIM scheduler of `pipe`'s noise schedule set to `steps` steps, and the shape of one latent at the
    model's own size: what a trajectory of the model starts from."""
    from studio.pipeline import make_scheduler

    scheduler = make_scheduler(pipe.scheduler.config, "ddim")
    scheduler.set_timesteps(steps, device=device)
    width, height = default_size(pipe)
    return scheduler, (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)


@torch.no_grad()
def denoise(unet, scheduler, x: torch.Tensor, prompt: Conditioning, empty: Conditioning, guidance: float,
            start: int, stop: int) -> torch.Tensor:
    """Latents `x` (one prompt's) taken from DDIM step `start` to `stop` of `scheduler.timesteps` with
    classifier-free guidance `guidance` (`empty`: the unconditional prompt)."""
    both = Conditioning.cat(empty, prompt)
    for t in scheduler.timesteps[start:stop]:
        uncond, cond = both.predict(unet, torch.cat([x, x]), t).chunk(2)
        x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    return x
