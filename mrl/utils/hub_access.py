"""Whether the Hugging Face Hub can be reached, and a failure said in one line: the one place every module that
downloads (datasets, pretrained backbones, run folders, uploads) asks.

Callers use the module (`hub_access.hub_unreachable()`), not a copy of its names, so that a test can stand in for the
network in one place.
"""

import os
import socket
from urllib.parse import urlparse

from mrl import UserError

# What a dataset download that failed should say next: how to go on without the Hub.
LOCAL_COPY_HINT = ("Pass --dataset_path with a local copy (the Hub's parquet layout, a save_to_disk folder or an image "
                   "folder with one subfolder per class), or set HF_HUB_OFFLINE=1 to use a copy already in the Hugging "
                   "Face cache.")
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def offline():
    """Whether HF_HUB_OFFLINE (or its older spelling, HF_DATASETS_OFFLINE) asks for the local cache only."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes")


def hub_unreachable(timeout=5):
    """None when a TCP connection to the Hub's host opens, else why not (one line). Skipped behind a proxy, where a
    direct connection says nothing."""
    from huggingface_hub import constants

    if any(os.environ.get(v) for v in PROXY_VARIABLES):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)  # the variable read now, as the libraries do
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as e:
        return f"cannot reach the Hugging Face Hub at {url.hostname} ({e.strerror or type(e).__name__})"
    return None


def require_hub(what, hint=LOCAL_COPY_HINT):
    """Fail in seconds, not after a minute of retries, when `what` (e.g. "download microsoft/cats_vs_dogs") needs the
    Hub and it cannot be reached; offline mode (which reads the cache) is left to the caller's library."""
    if offline():
        return
    problem = hub_unreachable()
    if problem:
        raise UserError(f"{problem}: cannot {what}. {hint}")


def local_copy_hint():
    """LOCAL_COPY_HINT, without the advice to set HF_HUB_OFFLINE where it is set already (then the copy is not in the
    cache, or not under the name asked for)."""
    if offline():
        return ("Pass --dataset_path with a local copy (the Hub's parquet layout, a save_to_disk folder or an image "
                "folder with one subfolder per class); HF_HUB_OFFLINE is set, and the Hugging Face cache does not hold "
                "it.")
    return LOCAL_COPY_HINT


def one_line(e):
    """An exception as one line of an error message: its type and the first line of what it says."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__
