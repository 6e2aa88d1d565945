"""Loading weights by name on a machine that may be offline: fail fast, from the cache."""

from __future__ import annotations

import contextlib
import logging
import socket
import urllib.parse
from collections.abc import Iterator

from usae.errors import UsaeError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def hub_offline_if_unreachable() -> Iterator[None]:
    """Put huggingface_hub in offline mode while loading if its endpoint cannot be reached.

    Without this, a machine with no network spends about a minute in connection retries before
    failing; offline mode answers from the local cache at once (or fails at once when it is empty).
    """
    try:
        import huggingface_hub.constants as hub
    except ImportError:
        yield
        return
    if hub.HF_HUB_OFFLINE:
        yield
        return
    host = urllib.parse.urlparse(hub.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
        reachable = True
    except OSError:
        reachable = False
    if reachable:
        yield
        return
    log.info("%s is unreachable: loading weights from the local cache only", host)
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = False


def offline_error(spec: str, e: Exception) -> UsaeError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UsaeError(
        f"{spec}: could not load pretrained weights (needs a download or a local copy; offline here?): "
        f"{type(e).__name__}: {first[:200]}"
    )
