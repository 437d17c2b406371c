"""Fail at once, in one line, when a model is named by hub id and the Hugging Face hub cannot be reached.

Without this, transformers and huggingface_hub retry an unreachable hub for about half a minute before
their error. One TCP connection to the endpoint (``HF_ENDPOINT``, default huggingface.co:443) with a
short timeout tells: unreachable and the model cached -> offline mode for this process (the cache is
used, no retries); unreachable and not cached -> one line naming the fix. ``HF_HUB_OFFLINE=1`` skips the
probe (the libraries then fail at once themselves).
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from urllib.parse import urlparse

from draftkit.errors import ModelLoadError

PROBE_TIMEOUT = 3.0


def _endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


@functools.lru_cache(maxsize=4)
def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT):
            return True
    except OSError:
        return False


def offline_requested() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an odd id or cache: treat as not cached
        return False


def _go_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as constants

        constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:  # read at import: a loaded datasets would still retry the hub
        import datasets.config as dconfig

        dconfig.HF_HUB_OFFLINE = True
        dconfig.HF_DATASETS_OFFLINE = True


def offline_if_unreachable() -> bool:
    """True when this process works offline: asked for (``HF_HUB_OFFLINE=1``), or the hub cannot be reached, in
    which case offline mode is switched on, so that datasets and lm-eval read their local caches and fail at
    once instead of retrying the hub for half a minute."""
    if offline_requested():
        return True
    host, port = _endpoint()
    if _reachable(host, port):
        return False
    global _switched
    _switched = True
    _go_offline()
    return True


_switched = False  # offline_if_unreachable found the hub unreachable (rather than HF_HUB_OFFLINE=1 asked)


def unreachable_hint() -> str:
    """Why the hub is not used, for an error line (no probe: the caller already knows it is offline)."""
    host, port = _endpoint()
    return f"the hub is offline ({f'{host}:{port} cannot be reached' if _switched else 'HF_HUB_OFFLINE=1'})"


def check_hub(repo_id: str) -> None:
    """Return if ``repo_id`` can be fetched (hub reachable, or cached: then offline mode); else raise."""
    if offline_requested():
        return
    host, port = _endpoint()
    if _reachable(host, port):
        return
    if _cached(repo_id):
        _go_offline()
        return
    raise ModelLoadError(
        f"{repo_id}: the Hugging Face hub ({host}:{port}) cannot be reached and the model is not in the local cache; "
        "pass a local directory (or download it where there is network), then retry"
    )
