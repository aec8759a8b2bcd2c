"""Process limits a daemon sets for itself at start."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)


def raise_file_limit() -> int:
    """Let this process open as many files as the system allows it (the soft limit
    up to the hard one): every connection is a file, and a daemon that runs out
    of them stops serving everyone. Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 16 if hard == resource.RLIM_INFINITY else hard
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            log.info("cannot raise the open-file limit from %d to %d", soft, target)
    return soft
