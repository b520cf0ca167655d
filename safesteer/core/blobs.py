"""Safetensors bytes (weights, factor blobs, vectors crossing the object store): the header alone."""

from __future__ import annotations

import json


def header(blob: bytes) -> dict:
    """The JSON header of safetensors bytes (tensor names, dtypes, offsets, ``__metadata__``), read
    without touching the tensors. Bytes that are not safetensors raise ``ValueError`` (or
    ``UnicodeDecodeError``)."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n])
