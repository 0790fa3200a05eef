"""User-facing errors: bad input, refused runs. The CLI turns them into one clear line and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a refused run: the message names the file or flag and says what to do."""

    exit_code = 2


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""
