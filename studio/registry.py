"""The method registry: every method is registered here once, by name.

A method is `studio.adapters.<name>` (what it is: config, layers, how its file
changes a weight) and a trainer (how it is learned: `trainers/base.py`'s
`MethodTrainer`, the loop contract, or a subclass of it in
`studio.trainers.<name>` where the method needs more than the default). The
CLI, the web app and the plugin find methods here and never name one in an
if/else chain. Modules are imported on first use, so listing methods is cheap.

Example:
    >>> sorted(METHODS)[:2]
    ['boft', 'lora']
    >>> get("oft").config({}).block_size
    32
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from studio.errors import StudioError
from studio.options import config_from_options

DEFAULT_TRAINER = "studio.trainers.base:MethodTrainer"


@dataclass(frozen=True)
class Method:
    """A registered method: its name, its kind of job, its default learning rates and where its halves live."""

    name: str
    kind: str  # "adapter" (`studio train`), "erase" (`studio erase`), "quantize" (`studio quantize`)
    summary: str
    # The default --learning-rate on the toy model: the `studio bench personalize` recipe's, measured there.
    toy_learning_rate: float
    learning_rate: float = 1e-4  # elsewhere: a starting point, not tuned here
    trainer_class: str = DEFAULT_TRAINER  # "module:Class", a MethodTrainer
    # How its artifact goes on a pipeline (studio.plugin): "weights", per-layer weight transforms (the default
    # kind: composes and fuses with the others); anything else attaches through `adapters/<m>.py::attach`.
    attaches: str = "weights"
    # The per-call inputs its artifact needs when sampling ("image_prompt"), which `studio sample` and the page
    # then require (and refuse when no applied artifact takes them).
    inputs: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        """The method's module name under `studio.adapters` (and `studio.trainers`): "ip-adapter" -> "ip_adapter"."""
        return self.name.replace("-", "_")

    @property
    def adapter(self) -> ModuleType:
        return importlib.import_module(f"studio.adapters.{self.module}")

    @property
    def config_class(self) -> type:
        """The method's options dataclass (`adapters/<name>.py`'s `CONFIG`)."""
        return self.adapter.CONFIG

    def config(self, options: dict):
        """The method's config from CLI/TOML options, converted and range-checked (unknown keys are an error).

        Example:
            >>> get("lora").config({"rank": "8"}).rank
            8
        """
        return config_from_options(self.config_class, options)

    @property
    def trainer(self):
        """How the method is learned: its `MethodTrainer` (trainers/base.py)."""
        module, _, cls = self.trainer_class.partition(":")
        return getattr(importlib.import_module(module), cls)(self)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("lora", "adapter", "low-rank update W + (alpha/r) B A, through PEFT", toy_learning_rate=1e-3),
        Method("oft", "adapter", "block-diagonal orthogonal rotation of each weight's input side", toy_learning_rate=2.5e-4),
        Method("boft", "adapter", "butterfly-factorised orthogonal rotation and per-output scale", toy_learning_rate=5e-4),
        Method("sara", "adapter", "sparse update of each weight's smallest entries", toy_learning_rate=3e-3,
               trainer_class="studio.trainers.sara:SaRATrainer"),
        Method("ip-adapter", "adapter", "image prompt through decoupled cross-attention (image projection + to_k_ip/to_v_ip)",
               toy_learning_rate=1e-3, trainer_class="studio.trainers.ip_adapter:IPAdapterTrainer",
               attaches="attention processors", inputs=("image_prompt",)),
        Method("t2i-adapter", "adapter", "control image (mask, edges) through a small network adding features to the UNet's down blocks",
               toy_learning_rate=1e-3, trainer_class="studio.trainers.t2i_adapter:T2IAdapterTrainer",
               attaches="added network", inputs=("control",)),
        Method("res-adapter", "adapter", "other resolutions and aspects: LoRA on the samplers + the ResNet norms",
               toy_learning_rate=2e-4, trainer_class="studio.trainers.res_adapter:ResAdapterTrainer",
               attaches="norms and sampler LoRA"),
        Method("spm", "erase", "rank-1 membranes in the transformer blocks, gated by the prompt (Facilitated Transport)",
               toy_learning_rate=3e-3, trainer_class="studio.trainers.spm:SPMTrainer", attaches="prompt-gated membranes"),
        Method("ant", "erase", "guidance kept in early steps, reversed in later ones: on the salient weights (one concept), or a LoRA per concept fused into the keys/values (several, or --refine)",
               toy_learning_rate=2e-3, learning_rate=5e-4, trainer_class="studio.trainers.ant:ANTTrainer"),
        Method("rece", "erase", "closed-form erasure in the cross-attention key/value projections (UCE + adversarial rounds)",
               toy_learning_rate=0.0, learning_rate=0.0,  # closed form: nothing is learned step by step
               trainer_class="studio.trainers.rece:RECETrainer"),
        Method("efficientdm", "quantize", "low-bit UNet: quantization-aware LoRA distilled from the full-precision model, no data",
               toy_learning_rate=3e-4, learning_rate=1e-4, trainer_class="studio.trainers.quantize:EfficientDMTrainer",
               attaches="quantized weights"),
        Method("ptq", "quantize", "low-bit UNet by calibration alone (post-training quantization, the baseline)",
               toy_learning_rate=0.0, learning_rate=0.0,  # closed form: nothing is learned step by step
               trainer_class="studio.trainers.quantize:PTQTrainer", attaches="quantized weights"),
        Method("qat", "quantize", "low-bit UNet by full quantization-aware training of every quantized weight (the costly baseline)",
               toy_learning_rate=5e-5, learning_rate=1e-6, trainer_class="studio.trainers.quantize:QATTrainer",
               attaches="quantized weights"),
    ]
}


def get(name: str) -> Method:
    """The registered method called `name`, or a `StudioError` listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise StudioError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}") from None
