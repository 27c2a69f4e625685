"""T2I-Adapter (Mou et al. 2023): a small network that reads a control image (a mask, an edge map) and adds its
features to the frozen UNet's down blocks, on diffusers' own `T2IAdapter`.

- The network is diffusers' `T2IAdapter`: PixelUnshuffle, conv_in, then blocks of residual convolutions, one
  feature map per UNet down block. Which variant and widths a UNet needs follows from its layout
  (`network_config`): a UNet whose first down block has attention (SD1.5) takes `full_adapter` (or the smaller
  `light_adapter`) with the UNet's widths at the VAE's downscale; a UNet whose first down block is plain and has
  three of them (SDXL, the toy model) takes `full_adapter_xl` at twice the VAE's downscale, whose fourth feature
  goes to the mid block. `check_fits` compares the feature shapes with where the UNet adds them.
- The features enter as the UNet's `down_intrablock_additional_residuals` (added after a down block's last
  resnet/attention, before its downsampler; after it for a block without attention), weighted by the
  adapter's scale. On a stock pipeline we put them there with a forward pre-hook on the UNet (`ControlHook`),
  so any text-to-image pipeline takes a control image; several adapters add their weighted features, as
  diffusers' `MultiAdapter` does, and the stock `StableDiffusionAdapterPipeline` computes the same thing.
- The control image is preprocessed as the stock adapter pipelines do it: pixels / 255, one channel for a
  grayscale image (masks, edges), three for colour. One of another size is fitted into the sample size with its
  aspect kept and padded with black (nothing), with a warning: the stock pipelines squash it instead.

The artifact is the folder `save_pretrained` writes (`config.json` + `diffusion_pytorch_model.safetensors`), so
`T2IAdapter.from_pretrained(folder)` loads it; our header rides in the safetensors metadata, with the condition
kind that `--control IMG:KIND` routes by.

Example:
    >>> from studio.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> network_config(pipe.unet, pipe.vae_scale_factor, T2IAdapterConfig())["adapter_type"]
    'full_adapter'
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from studio.errors import StudioError
from studio.pipeline import quiet_dtype_notice

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # what save_pretrained writes and from_pretrained reads
CONDITION_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,31}")
STOCK_LOADER = "T2IAdapter.from_pretrained(FOLDER) + StableDiffusionAdapterPipeline(..., adapter=...)"


@dataclass
class T2IAdapterConfig:
    """T2I-Adapter options. `condition`: the kind of control image it reads (ShapesWorld draws `mask` and `edge`;
    for a folder of your own, any word: it is what `--control IMG:KIND` names). `adapter_type`: `full` (the
    paper's) or `light` (fewer channels; fits SD1.5-layout UNets only). `color`: the control image has three
    channels (a colour sketch or segmentation) rather than one (masks and edges)."""

    condition: str = "mask"
    adapter_type: Literal["full", "light"] = "full"
    color: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.condition, str) or not CONDITION_PATTERN.fullmatch(self.condition):
            raise StudioError(f"--condition {self.condition!r}: must be a short lowercase word (letters, digits, - or _; "
                              "e.g. mask, edge, depth), the name `--control IMG:KIND` gives it")


CONFIG = T2IAdapterConfig


def _feature_shapes(unet: nn.Module, latent: int) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """(channels, side) of the residual each down block adds for a square latent of side `latent`, and the mid
    block's: a block with attention adds before its downsampler, a plain block after it (diffusers' UNet)."""
    shapes, side = [], latent
    for block, channels in zip(unet.down_blocks, unet.config.block_out_channels):
        downsamples = getattr(block, "downsamplers", None) is not None
        if getattr(block, "has_cross_attention", False):
            shapes.append((channels, side))
            side = side // 2 if downsamples else side
        else:
            side = side // 2 if downsamples else side
            shapes.append((channels, side))
    return shapes, (unet.config.block_out_channels[-1], side)


def network_config(unet: nn.Module, vae_scale_factor: int, config: T2IAdapterConfig) -> dict:
    """The `T2IAdapter(...)` arguments that fit `unet` (see the module docstring)."""
    channels = list(unet.config.block_out_channels)
    in_channels = 3 if config.color else 1
    if unet.config.down_block_types[0].startswith("CrossAttn"):  # SD1.5's layout
        if config.adapter_type == "light":
            if len(channels) < 2 or channels[-1] != channels[-2]:
                raise StudioError(f"--adapter-type light needs a UNet whose last two down blocks are as wide (SD1.5: "
                                  f"1280, 1280); this one's are {channels}; use --adapter-type full")
            return dict(in_channels=in_channels, channels=channels[:-1], num_res_blocks=2,
                        downscale_factor=vae_scale_factor, adapter_type="light_adapter")
        return dict(in_channels=in_channels, channels=channels, num_res_blocks=2,
                    downscale_factor=vae_scale_factor, adapter_type="full_adapter")
    if len(channels) != 3 or config.adapter_type == "light":  # SDXL's layout: diffusers' XL adapter has 4 features
        raise StudioError(f"this UNet ({len(channels)} down blocks, the first without attention) fits "
                          f"{'only the full T2I-Adapter; use --adapter-type full' if len(channels) == 3 else 'no T2I-Adapter layout diffusers has'}")
    return dict(in_channels=in_channels, channels=channels + channels[-1:], num_res_blocks=2,
                downscale_factor=2 * vae_scale_factor, adapter_type="full_adapter_xl")


def check_fits(unet: nn.Module, network: nn.Module, vae_scale_factor: int) -> None:
    """Refuse a T2I-Adapter whose features do not land where `unet` adds them (another base model's)."""
    side = network.total_downscale_factor * 2 ** len(unet.down_blocks)
    with torch.no_grad():
        probe = next(network.parameters())
        features = network(torch.zeros(1, network.config.in_channels, side, side, device=probe.device, dtype=probe.dtype))
    got = [(f.shape[1], f.shape[2]) for f in features]
    expected, mid = _feature_shapes(unet, side // vae_scale_factor)
    if got[:len(expected)] != expected or len(got) > len(expected) + 1 or (len(got) > len(expected) and got[-1] != mid):
        raise StudioError(f"this T2I-Adapter's features {got} do not fit this UNet, which adds {expected} (channels, side "
                          "at a test size); it was made for another base model")


def build(pipe, config: T2IAdapterConfig):
    """A fresh T2I-Adapter for `pipe`'s UNet, on its device.

    Example:
        >>> from studio.testing import tiny_sdxl_pipeline
        >>> build(tiny_sdxl_pipeline(), T2IAdapterConfig()).config.adapter_type
        'full_adapter_xl'
    """
    from diffusers import T2IAdapter

    network = T2IAdapter(**network_config(pipe.unet, pipe.vae_scale_factor, config)).to(pipe.unet.device)
    check_fits(pipe.unet, network, pipe.vae_scale_factor)
    return network


def parameter_count(unet: nn.Module, vae_scale_factor: int, config: T2IAdapterConfig | None = None) -> int:
    """The parameters of the T2I-Adapter that fits `unet` (built on the meta device: nothing is allocated).

    Example:
        >>> from studio.testing import tiny_sd_pipeline
        >>> pipe = tiny_sd_pipeline()
        >>> parameter_count(pipe.unet, pipe.vae_scale_factor) > parameter_count(pipe.unet, pipe.vae_scale_factor, T2IAdapterConfig(adapter_type="light"))
        True
    """
    from diffusers import T2IAdapter

    with torch.device("meta"):
        network = T2IAdapter(**network_config(unet, vae_scale_factor, config or T2IAdapterConfig()))
    return sum(p.numel() for p in network.parameters())


def recognises(keys: list[str]) -> bool:
    """Whether a file's keys are a diffusers `T2IAdapter`'s (an official release's folder).

    Example:
        >>> recognises(["adapter.conv_in.weight", "adapter.body.0.resnets.0.block1.weight"])
        True
    """
    return bool(keys) and all(k.startswith("adapter.") for k in keys) and any(k.startswith("adapter.body.") for k in keys)


def artifact_file(path: Path) -> Path:
    """The weights file of a T2I-Adapter folder (`save_pretrained`'s), or `path` itself when it is a file."""
    return path / WEIGHTS_NAME if path.is_dir() else path


# --- the control image ---------------------------------------------------------------------------------------


def parse_control(spec: str) -> tuple[str, str | None]:
    """`--control IMG[:KIND]` -> (image path, kind or None); a path that exists is taken whole (it may hold a colon).

    Example:
        >>> parse_control("shape-mask.png:mask"), parse_control("shape-mask.png")
        (('shape-mask.png', 'mask'), ('shape-mask.png', None))
    """
    if Path(spec).is_file() or ":" not in spec:
        return spec, None
    path, kind = spec.rsplit(":", 1)
    if not CONDITION_PATTERN.fullmatch(kind):
        raise StudioError(f"--control {spec!r}: the kind after the colon must be a short lowercase word (mask, edge, ...)")
    return path, kind


def control_pixels(image: Image.Image, color: bool, what: str) -> Image.Image:
    """`image` as the adapter reads it: one channel ("L") or three ("RGB"); a clear error for a channel count that
    does not fit (two channels, CMYK, a see-through alpha, colour where a mask is expected).

    Example:
        >>> control_pixels(Image.new("LA", (8, 8)), False, "--control mask.png").mode
        Traceback (most recent call last):
        studio.errors.StudioError: --control mask.png has 2 channels (LA); a control image has 1 (grayscale) or 3 (RGB) — save it as grayscale or RGB without transparency
    """
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("1", "I", "I;16", "F"):
        image = image.convert("L")
    bands = image.getbands()
    if image.mode == "RGBA" and image.getextrema()[3][0] == 255:  # an opaque alpha carries nothing
        image = image.convert("RGB")
    if image.mode not in ("L", "RGB"):
        raise StudioError(f"{what} has {len(bands)} channels ({image.mode}); a control image has 1 (grayscale) or 3 (RGB) "
                          "— save it as grayscale or RGB without transparency")
    if color:
        return image.convert("RGB")
    if image.mode == "RGB":
        pixels = np.asarray(image)
        if not (np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])):
            raise StudioError(f"{what} is in colour, but this T2I-Adapter reads a one-channel image (a mask or an edge "
                              "map, white on black); pass the grayscale control image, not the picture itself")
        image = image.convert("L")
    return image


def check_controls(configs: list[dict], controls: list[tuple[Image.Image, str | None]]) -> None:
    """Refuse control images that the applied T2I-Adapters (their header configs) cannot read, before any model is
    loaded: where every adapter reads one channel, each image must be grayscale (a colour picture is a mistake).
    An official release's file has no studio header: its config is given as {"color": None} and nothing is checked.

    Example:
        >>> check_controls([{"condition": "mask", "color": False}], [(Image.new("RGB", (8, 8), "red"), None)])
        Traceback (most recent call last):
        studio.errors.StudioError: --control is in colour, but this T2I-Adapter reads a one-channel image (a mask or an edge map, white on black); pass the grayscale control image, not the picture itself
    """
    if configs and all(config.get("color") is False for config in configs):
        for image, _ in controls:
            control_pixels(image, False, "--control")


def fit_control(image: Image.Image, width: int, height: int, what: str = "control image") -> Image.Image:
    """`image` at width x height: as it is when it has that size; otherwise scaled to fit with its aspect kept and
    centred on black, with a warning saying so (a squashed mask would draw a squashed object).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True):
        ...     fit_control(Image.new("L", (64, 32), 255), 32, 32).getbbox()
        (0, 8, 32, 24)
    """
    if image.size == (width, height):
        return image
    scale = min(width / image.width, height / image.height)
    inner = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    canvas = Image.new(image.mode, (width, height), 0)
    canvas.paste(image.resize(inner, Image.LANCZOS), ((width - inner[0]) // 2, (height - inner[1]) // 2))
    padded = f" ({inner[0]}x{inner[1]}, padded with black)" if inner != (width, height) else ""
    warnings.warn(f"{what} is {image.width}x{image.height}; fitted into {width}x{height} with its aspect kept{padded}",
                  stacklevel=2)
    return canvas


def control_tensor(images: list[Image.Image]) -> torch.Tensor:
    """Control images (all "L" or all "RGB", one size) -> (n, channels, H, W) in [0, 1], as the stock pipelines
    make them."""
    arrays = [np.asarray(image, dtype=np.float32) / 255.0 for image in images]
    arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# --- on a pipeline -------------------------------------------------------------------------------------------


def _expand(feature: torch.Tensor, batch: int) -> torch.Tensor:
    """Features of n control images for a UNet batch of `batch` (classifier-free guidance doubles it)."""
    if feature.shape[0] == batch:
        return feature
    if batch % feature.shape[0]:
        raise StudioError(f"{feature.shape[0]} control images for a batch of {batch}; pass one, or one per image")
    return feature.repeat(batch // feature.shape[0], 1, 1, 1)


class ControlHook:
    """A UNet forward pre-hook adding `scale` x this adapter's features to `down_intrablock_additional_residuals`
    (summed with what is there: another adapter's, a stock adapter pipeline's). `features` gives them for the
    UNet's input sample, or is None: the hook then does nothing."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale
        self.enabled = True
        self.features: Callable[[torch.Tensor], list[torch.Tensor]] | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        if self.features is None or not self.enabled or self.scale == 0:
            return None
        sample = args[0] if args else kwargs["sample"]
        ours = [_expand(f, sample.shape[0]) * self.scale for f in self.features(sample)]
        there = kwargs.get("down_intrablock_additional_residuals") or []
        kwargs["down_intrablock_additional_residuals"] = [
            a if b is None else b if a is None else a + b for a, b in zip_longest(there, ours)]
        return args, kwargs


class T2IAdapterAttachment:
    """A T2I-Adapter folder on a pipeline: the network (through the stock `from_pretrained`) and a `ControlHook` on
    the UNet, which `remove` takes off again. The control image comes per call (`call_inputs(control=...)`);
    its features are computed once per image and sample size."""

    def __init__(self, pipe, path: Path, scale: float, condition: str | None) -> None:
        from diffusers import T2IAdapter

        folder = path.parent
        if not (folder / "config.json").is_file():
            raise StudioError(f"{path}: a T2I-Adapter needs its config.json beside it (the folder save_pretrained "
                              "writes); pass the folder")
        unet = pipe.unet
        try:
            with quiet_dtype_notice():
                network = T2IAdapter.from_pretrained(folder).to(unet.device, unet.dtype)
        except (OSError, ValueError, RuntimeError) as error:
            raise StudioError(f"{folder}: diffusers could not load this T2I-Adapter ({error})") from None
        check_fits(unet, network, pipe.vae_scale_factor)
        self.pipe, self.network, self.condition = pipe, network.eval().requires_grad_(False), condition
        self.color = network.config.in_channels == 3
        self.hook = ControlHook(scale)
        self.hook.features = self._features
        self.control: Image.Image | None = None
        self._cache: tuple | None = None
        self.handle = unet.register_forward_pre_hook(self.hook, with_kwargs=True)
        self.layers = [f"unet.down_blocks.{i}" for i in range(len(unet.down_blocks))]

    def _features(self, sample: torch.Tensor) -> list[torch.Tensor]:
        if self.control is None:
            raise StudioError("a T2I-Adapter is applied but no control image was given for this call; pass one "
                              "(studio.plugin.call_inputs(pipe, control=...), or --control IMG)")
        factor = self.pipe.vae_scale_factor
        key = (id(self.control), sample.shape[-1] * factor, sample.shape[-2] * factor, sample.device, sample.dtype)
        if self._cache is None or self._cache[0] != key:
            image = fit_control(self.control, key[1], key[2], f"the control image for {self.condition or 'the T2I-Adapter'}")
            with torch.no_grad():
                features = self.network(control_tensor([image]).to(sample.device, sample.dtype))
            self._cache = (key, features)
        return self._cache[1]

    def set_scale(self, scale: float) -> None:
        self.hook.scale = scale

    def set_enabled(self, enabled: bool) -> None:
        self.hook.enabled = enabled

    def call_inputs(self, control=None, **_) -> dict:
        """Take this adapter's control image from `control` (a list of (image, kind or None)); the features go
        in through the hook, so the pipeline call gets no argument."""
        self.control = control_pixels(pick_control(self.pipe, self, control or []), self.color,
                                      f"the control image for {self.condition or 'the T2I-Adapter'}")
        return {}

    def remove(self) -> None:
        self.handle.remove()


def pick_control(pipe, attachment: T2IAdapterAttachment, controls: list[tuple[Image.Image, str | None]]) -> Image.Image:
    """The control image of `attachment` among `controls`: the one labelled with its condition kind, else the one
    without a label. A label that no applied T2I-Adapter reads is refused, as is an ambiguous choice."""
    from studio.plugin import attachments

    kinds = [a.condition for a in attachments(pipe) if isinstance(a, T2IAdapterAttachment)]
    unread = sorted({kind for _, kind in controls if kind is not None and kind not in kinds})
    if unread:
        raise StudioError(f"--control ...:{unread[0]}: no applied T2I-Adapter reads {unread[0]!r} control images "
                          f"(applied: {', '.join(k or '?' for k in kinds)})")
    mine = [image for image, kind in controls if kind is not None and kind == attachment.condition]
    unlabelled = [image for image, kind in controls if kind is None]
    label = attachment.condition or "KIND"
    if len(mine) > 1:
        raise StudioError(f"several --control images are labelled {label!r}; pass one per T2I-Adapter")
    if mine:
        return mine[0]
    if len(unlabelled) == 1:  # one unlabelled control image feeds every adapter that has no labelled one
        return unlabelled[0]
    if unlabelled:
        raise StudioError(f"{len(unlabelled)} control images without a kind: label them, --control IMG:{label}")
    raise StudioError(f"the {attachment.condition or 'applied'} T2I-Adapter needs a control image: pass --control IMG:{label}")


def attach(pipe, tensors: dict[str, torch.Tensor], path: Path, scale: float, name: str) -> T2IAdapterAttachment:
    """Put a T2I-Adapter (our folder, or an official release's) on `pipe` at `scale`."""
    from studio.artifact import read_header

    try:
        condition = read_header(path).config.get("condition")
    except StudioError:  # an official release: no studio header, no condition kind
        condition = None
    return T2IAdapterAttachment(pipe, path, scale, condition)


def file_metadata(config) -> dict[str, str]:
    """Extra header entries (none beyond the studio header, whose config names the condition kind)."""
    return {}
