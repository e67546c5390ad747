"""Quieter third-party libraries for the command line and the benchmark workers: a leaf module, so that
graft.cli and graft.bench can both use it without importing each other."""

from __future__ import annotations

import logging
import os


def quiet_libraries() -> None:
    """Silence transformers' and the hub's progress bars and advisory warnings: graft prints its own
    progress, and their output would interleave with it."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    import transformers

    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )

    # bitsandbytes: on AVX512-BF16 CPUs it looks for a hub kernel for its inference layout, which graft
    # keeps off (graft.models.keep_trainable_4bit_layout); and LLM.int8 says it computes in float16
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast", category=UserWarning)

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
