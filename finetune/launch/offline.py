"""The Hugging Face Hub: can this process use it? One decision, made once, through huggingface_hub.

    HF_HUB_OFFLINE=1 finetune lora ...          # never ask the Hub (only local directories and the cache)
    HF_ENDPOINT=https://hf-mirror.example ...   # a mirror: that is the Hub asked
    HTTPS_PROXY=http://proxy:3128 ...           # honoured by huggingface_hub's own HTTP client

Without a reachable Hub, a Hub id retries for ~46 s before failing and `evaluate` fetches metric
scripts, so every command that may touch the Hub starts with `use_offline_defaults()`: offline mode
when the Hub does not answer, so that a missing model fails at once with a clear error.
"""

from __future__ import annotations

import functools
import os

TRUE = ("1", "on", "yes", "true")  # what huggingface_hub accepts for HF_HUB_OFFLINE


def offline_requested() -> bool:
    """HF_HUB_OFFLINE is set (read now: this process may have set it since huggingface_hub was imported)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in TRUE


@functools.cache
def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hub (HF_ENDPOINT, default huggingface.co) answers an HTTP request, asked with
    huggingface_hub's own client (so its proxy settings apply). False in offline mode, without asking."""
    if offline_requested():
        return False
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # no DNS, refused, timed out, proxy failure, offline mode: all mean "cannot use it"
        return False
    return True


def hub_status() -> str:
    """One line for `finetune env`."""
    if offline_requested():
        return "offline mode (HF_HUB_OFFLINE=1)"
    from huggingface_hub import constants

    where = "" if constants.ENDPOINT == constants._HF_DEFAULT_ENDPOINT else f" ({constants.ENDPOINT})"
    return f"reachable{where}" if hub_reachable() else f"unreachable{where} (finetune runs offline)"


def unreachable_reason() -> str:
    """Why a Hub id cannot be fetched, for error messages."""
    return "offline mode is on (HF_HUB_OFFLINE=1)" if offline_requested() else "the Hugging Face Hub is unreachable"


def use_offline_defaults() -> None:
    """Offline-safe settings before the Hugging Face libraries fetch anything."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if hub_reachable():
        return
    # Without these, a Hub id retries for ~46 s and evaluate fetches metric scripts.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
    import sys

    if "huggingface_hub" in sys.modules:  # it read HF_HUB_OFFLINE when imported (by hub_reachable)
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = offline_requested()
