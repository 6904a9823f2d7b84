"""Helpers behind LLM.ipynb: config, data, chat rendering, training, evaluation."""
import logging


class _DropOptionalHubKernelNotice(logging.Filter):
    """bitsandbytes on a CPU looks for an optional faster kernel on the Hugging Face Hub ("pip install kernels")
    at import and logs a warning when it is absent; the plain CPU path it falls back to is the one tested here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropOptionalHubKernelNotice())

__version__ = "0.1.0"
