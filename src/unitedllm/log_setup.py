"""How a UnitedLLM process logs: ``unitedllm``'s own records at INFO, libraries only when they fail.

Every command calls :func:`setup_logging`: ``unitedllm`` (:mod:`unitedllm.cli`), every process of a
silo (:mod:`unitedllm.silo.worker`), ``unitedllm serve``, ``unitedllm agent``, ``unitedllm package
run`` and ``unitedllm-build``. They differ only in the handler (rich columns on a terminal, or
:func:`line_handler` with the command's own line format) and in the level, so every one of them
masks secrets the same way and quiets the same libraries.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

__all__ = ["LIBRARY_LOGGERS", "line_handler", "quiet_deepspeed_cpu_notice", "setup_logging"]

# Libraries whose INFO and WARNING records would bury the run's own story; their errors still show.
LIBRARY_LOGGERS = (
    "transformers",
    "datasets",
    "peft",
    "huggingface_hub",  # its retry warnings while offline; the load's own error still says what failed
    "httpx",
    "botocore",
    "aiobotocore",
    "torch",
    # DeepSpeed sets its logger's level again when it is imported: see quiet_deepspeed_cpu_notice.
    "DeepSpeed",
)


class _DeepSpeedCpuNotice(logging.Filter):
    """Drops DeepSpeed's "Setting accelerator to CPU" warning when torch sees no GPU either."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Setting accelerator to CPU"):
            return True
        import torch

        return bool(torch.cuda.is_available())


def quiet_deepspeed_cpu_notice() -> None:
    """transformers imports DeepSpeed where it is installed, and DeepSpeed then warns that it found no
    GPU: noise on a CPU-only machine, kept wherever torch sees a GPU that DeepSpeed missed. A filter,
    not a level, because DeepSpeed sets its logger's level when it is imported (idempotent)."""
    ds = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DeepSpeedCpuNotice) for f in ds.filters):
        ds.addFilter(_DeepSpeedCpuNotice())


def line_handler(fmt: str) -> logging.Handler:
    """One plain line per record on standard error, in ``fmt`` (a :class:`logging.Formatter` format)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    return handler


def setup_logging(verbose: bool, *, handler: logging.Handler, level: int = logging.INFO) -> None:
    """Route every record through ``handler`` with secrets masked; ``unitedllm`` logs at ``level``.

    ``verbose`` shows ``unitedllm``'s debug records and leaves libraries' progress bars,
    deprecation notices and warnings on; without it they are off, as they would scroll over the live display.
    """
    from unitedllm.config.redaction import SecretFilter

    if not verbose:
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        # Both libraries set their loggers' level again when first imported (after this runs).
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
    handler.addFilter(SecretFilter())
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("unitedllm").setLevel(logging.DEBUG if verbose else level)
    for noisy in LIBRARY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    quiet_deepspeed_cpu_notice()
