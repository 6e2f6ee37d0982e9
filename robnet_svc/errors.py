"""Errors the command line turns into one clear line.

`RobnetError` is bad input or usage: the CLI prints its message on one line and exits 2
(no traceback unless `--debug`). Its message must say what was wrong, with which file,
node or option, and what to do.

`SoundnessError` is a bug in robnet-svc itself: a certificate contradicted by a concrete
counterexample. It is never caught silently; the CLI exits 3.
"""


class RobnetError(Exception):
    """Bad input or usage (exit code 2)."""

    exit_code = 2


class SoundnessError(Exception):
    """A certified sample was broken by a concrete attack: a bug, reported loudly (exit 3)."""

    exit_code = 3
