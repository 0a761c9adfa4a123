"""The Hugging Face hub, asked once: an unreachable hub means offline mode, not a minute of retries.

huggingface_hub retries each request when the network is down (about a minute before timm's load gives
up). One short connection attempt first tells whether the hub can be reached; when it cannot, the load
runs in huggingface_hub's offline mode, so weights already in the local cache still load and missing ones
fail at once with the project's one-line message.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

from huggingface_hub import constants

PROBE_TIMEOUT_S = 3.0


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub's endpoint (``$HF_ENDPOINT``) opens within ``timeout`` seconds."""
    if constants.is_offline_mode():
        return False
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextmanager
def offline_unless_reachable() -> Iterator[None]:
    """Run the body in huggingface_hub's offline mode when the hub cannot be reached."""
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or not hub_reachable()
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved
