"""User-facing errors: one line that names the problem and the fix."""

from __future__ import annotations


class LandscapeError(Exception):
    """A problem with the user's input (file, option, data). The CLI prints it on one line, exit 2."""
