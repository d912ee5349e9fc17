"""What every flaxdepth command-line entry point shares."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable


def quiet_on_closed_pipe(main: Callable[..., int]) -> Callable[..., int]:
    """`main`, ending with status 1 and no traceback when its reader stops reading (`... | head`),
    as Python's documentation on SIGPIPE advises."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            status = main(*args, **kwargs)
            sys.stdout.flush()  # a block-buffered pipe fails here, not at the interpreter's exit
            return status
        except BrokenPipeError:
            # the interpreter flushes stdout once more at exit: point it at /dev/null so that
            # flush cannot fail a second time
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1

    return wrapped
