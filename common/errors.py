"""The user-error type, its CLI wrapper (one line, exit status 2), and any exception as one line."""

import functools
import re
import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input from the user: the message is one line naming the file or key, what is wrong, what to do."""


# torch re-raises a DataLoader worker's exception in the main process with the worker's traceback in the text
WORKER_TRACEBACK = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback", re.S)


def one_line(error: UserError) -> str:
    """The message of a UserError, unwrapped from a DataLoader worker's traceback where torch put it in one."""
    text = str(error)
    if WORKER_TRACEBACK.match(text):
        last = text.rstrip().splitlines()[-1]
        text = last.split("UserError: ", 1)[-1]
    return text


def cli(main: Callable[..., None]) -> Callable[..., None]:
    """Run a command's main(); a UserError becomes `error: <message>` on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapped


def first_line(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
