"""Diffusion Studio: customize and edit text-to-image diffusion models (see README.md).

Importing the package quiets one third-party notice, before any module imports diffusers: transformers
says, once per image-processor name diffusers imports, that torchvision is missing and it falls back to
the PIL processor. The fallback is what we use (the toy model ships a PIL processor), so the notice is
noise a user cannot act on, printed by every command.
"""

import logging


class _DropTorchvisionFallbackNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionFallbackNotice())
