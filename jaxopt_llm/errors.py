"""`ParameterError`: bad input to a library function, named by its Python parameter.

The message reads `name=value: what is wrong`, the way the caller wrote the call. A front
end that took the value from one of its own options (the CLI's `--window`) re-words it
with `for_flag`, so each audience reads the names it typed.
"""

from __future__ import annotations

from typing import Any


class ParameterError(ValueError):
    """A ValueError about one parameter's value.

    Args:
        parameter: the Python parameter's name, e.g. "num_tokens".
        value: the value it was given.
        problem: what is wrong with it and, where possible, what to do instead.

    Example:
        >>> err = ParameterError("window", 1, "must be at least 2")
        >>> str(err), err.for_flag("--window")
        ('window=1: must be at least 2', '--window 1: must be at least 2')
    """

    def __init__(self, parameter: str, value: Any, problem: str) -> None:
        self.parameter = parameter
        self.value = value
        self.problem = problem
        super().__init__(f"{parameter}={value!r}: {problem}")

    def for_flag(self, flag: str) -> str:
        """The same message naming a command-line flag: `--flag value: problem`.

        Args:
            flag: the flag the value came from.

        Returns:
            The re-worded message.
        """
        return f"{flag} {self.value!r}: {self.problem}"
