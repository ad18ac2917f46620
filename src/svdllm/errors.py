"""What svdllm raises for problems a user can fix.  Library messages name options (``ratio``, ``finetune.lr``),
never command-line flags: the CLI maps options to its flags and prints any of these in one line."""
from __future__ import annotations


class SvdllmError(Exception):
    """A problem with the input, the data, the files or the environment, not a bug."""


class OptionError(SvdllmError, ValueError):
    """An option's value, or a combination of options, that cannot work; ``option`` names the field, and other
    options the message mentions stand in backticks (`force`), so that a front end can name its own flags."""

    def __init__(self, option: str, detail: str) -> None:
        super().__init__(f"{option}: {detail}")
        self.option, self.detail = option, detail


class FormatError(SvdllmError, ValueError):
    """A folder or file that is not what svdllm can read (not a model, damaged, tampered with)."""


class DataError(SvdllmError, ValueError):
    """Text, windows or numbers that the run cannot use (too short, not UTF-8, a non-finite loss)."""


class RunFolderError(SvdllmError):
    """A run folder that belongs to another run, or is held by another process."""
