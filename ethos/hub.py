"""Whether the Hugging Face hub can be reached, asked before anything is fetched from it. Without network the hub
clients retry for minutes before they fail; one TCP connect to the endpoint answers in seconds, so a command
that needs the hub fails at once, in one line that says to point at a local copy instead.

The endpoint is $HF_ENDPOINT (huggingface_hub's own setting), else https://huggingface.co.
"""

import os
import socket
from urllib.parse import urlparse

DEFAULT_ENDPOINT = "https://huggingface.co"


def hub_reachable(timeout: float = 3.0) -> bool:
    """True if a TCP connection to the hub endpoint opens within `timeout` seconds."""
    url = urlparse(os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False
