"""Diffusion Studio: customize and edit text-to-image diffusion models (see README.md).

Importing the package quiets third-party notices a user cannot act on, printed by every command, before any
module imports diffusers:
- transformers says, once per image-processor name diffusers imports, that torchvision is missing and it falls
  back to the PIL processor: the fallback is what we use (the toy model ships a PIL processor);
- where torchao is installed (the `int8` extra), diffusers imports it at start-up: torchao says it could not load
  its CUDA-only extensions on a CPU build, torch that two of its enums are registered the old way, and diffusers
  that it cannot import tensor classes this torchao version moved (we use neither).
"""

import logging

_NOISE = {
    "transformers.utils.import_utils": "requires torchvision (not installed)",
    "torchao": "Failed to load",
    "torch.utils._pytree": "is an Enum subclass and is now natively supported",
    "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects",
}


class _DropNotice(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


for _logger, _text in _NOISE.items():
    logging.getLogger(_logger).addFilter(_DropNotice(_text))
