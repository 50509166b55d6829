"""Progress bars only where someone watches: on a terminal, not in a redirected log."""
from __future__ import annotations


def bar_off(wanted: bool) -> bool | None:
    """tqdm's `disable` for a bar the caller wants (or not): None lets tqdm switch the bar off when its
    stream is not a terminal (no escape codes in log files); True switches it off."""
    return None if wanted else True
