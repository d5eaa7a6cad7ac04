"""Assertions shared by the CLI tests of every package."""

from __future__ import annotations


def one_error_line(result) -> str:
    """A click run that failed cleanly: non-zero exit, no traceback, exactly one ``Error`` line (returned)."""
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # handled, no traceback
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]
