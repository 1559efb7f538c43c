"""The OS error behind the errors of Rust-backed libraries, for the callers' disk-error handling."""

from __future__ import annotations

import errno
import os
import re


def os_error_from(e: BaseException, path) -> OSError | None:
    """The OSError behind an error of a Rust-backed library (tokenizers raises a bare Exception, safetensors its
    SafetensorError, both ending in "(os error 28)" for a full disk), so that the caller's disk-error handling
    (one line, or a fallback) sees it; None when the message names no OS error."""
    if isinstance(e, OSError):
        return e
    m = re.search(r"\(os error (\d+)\)", str(e))
    if not m:
        return None
    code = int(m.group(1))
    return OSError(code, os.strerror(code) if code in errno.errorcode else str(e), str(path))
