"""The project's own error types: problems with what the user gave (flags, config, input files), as opposed to bugs.

The entry points (`inference.py`, `train.py`, `demo.py`, `scripts/*.py`) report a `UserError` as one line and exit
with status 2; every other exception keeps its traceback, so a bug is never mistaken for bad input. Each class also
derives from the built-in exception it refines (ValueError, FileNotFoundError), so callers that catch those keep
working. Messages name the file or flag, the key, and what was expected.
"""
from __future__ import annotations

import contextlib
import pickle
import sys
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """Something the user can fix: reported in one line, exit status 2."""


class InputError(UserError, ValueError):
    """A bad command-line value or input file content (a prompt, a size, a corrupt weights file)."""


class ConfigError(InputError):
    """A configuration problem, with the file and key in the message."""


class InputKeyError(InputError, KeyError):
    """An input file lacks a key it must hold (a checkpoint entry, a metadata field); also a KeyError."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or that a named folder must hold) does not exist."""


class BusyError(UserError):
    """A resource is held by another live process (a training logdir, a prompt being generated)."""


def one_line(err: BaseException) -> str:
    """The first line of an error's message (omegaconf and others append detail lines)."""
    text = str(err.args[0]) if err.args else str(err)
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def reading(what: str) -> Iterator[None]:
    """Around the loading of files the user named (weights, tokenizers, codecs): a library's complaint about their
    content becomes an `InputError` naming `what`, a missing one a `MissingFileError`. Only the exception types that
    file parsers raise are translated; anything else stays a bug with its traceback."""
    from safetensors import SafetensorError
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError as err:
        raise MissingFileError(f"{what}: {one_line(err)}") from err
    except (ValueError, KeyError, OSError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
        raise InputError(f"{what}: unreadable or not what was expected ({type(err).__name__}: "
                         f"{one_line(err)})") from err


def report_user_errors(fn: Callable[[], T], prog: str = "error") -> T | int:
    """`fn()`, with a `UserError` printed as `<prog>: <message>` on stderr and turned into exit status 2; anything
    else propagates with its traceback."""
    try:
        return fn()
    except UserError as err:
        print(f"{prog}: {one_line(err)}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
