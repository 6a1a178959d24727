"""hift: hierarchical full-parameter fine-tuning (HiFT, arXiv 2401.15207)."""

import logging

__version__ = "0.1.0"

# transformers imports peft when it is installed, and peft imports bitsandbytes, whose CPU
# backend warns at import time about an optional 4-bit kernel hift never uses: a stray
# line before every command's output. Its errors still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# The same import loads bitsandbytes' CPU kernel through the `kernels` package, which says
# offline (HF_HUB_OFFLINE=1, as in the tests and the demo) that it skips a publisher check.
logging.getLogger("kernels._internals.hf_hub").setLevel(logging.ERROR)
