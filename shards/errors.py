"""One error type for bad user input, and the wrapper that turns it into one line and a non-zero exit."""

import functools
import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input from the user: the message is one line naming the file or key, what is wrong, what to do."""


def cli(main: Callable[..., None]) -> Callable[..., None]:
    """Run a command's main(); a UserError becomes `error: <message>` on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapped
