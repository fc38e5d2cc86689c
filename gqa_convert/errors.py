"""The exceptions the library raises on purpose, one type per kind of failure.

The CLI maps each type to an exit code (`exit_code`) in one place; the table is in the
README. Messages name the file, field or tensor at fault and, where there is one, the fix.
"""


class GQAConvertError(Exception):
    """Base of every deliberate failure. Anything else reaching the CLI is a bug."""

    exit_code = 1


class UsageError(GQAConvertError):
    """The command line asks for something inconsistent."""

    exit_code = 2


class BadInputError(GQAConvertError):
    """A source file is missing, unreadable, corrupt, or disagrees with config.json."""

    exit_code = 3


class InsufficientMemoryError(BadInputError):
    """Verification would need more memory than the budget (`--max-memory`, or what is free)."""


class UnsupportedModelError(GQAConvertError):
    """A well-formed checkpoint of an architecture, rope type or feature we do not handle."""

    exit_code = 4


class ParityError(GQAConvertError):
    """The converted model's logits differ from the HuggingFace model's beyond tolerance."""

    exit_code = 5


class OutputError(GQAConvertError):
    """The output cannot be written: it exists, its parent is read-only, the disk is full."""

    exit_code = 6


class HubError(GQAConvertError):
    """The HuggingFace Hub refused or failed a request."""

    exit_code = 7


def listing(what: str, problems: list[str], shown: int = 20) -> str:
    """One message for several offenders, its first line a summary: what is wrong, how many,
    and the first offender; then each offender (at most `shown`) on an indented line."""
    if len(problems) == 1:
        return f"{what}: {problems[0]}"
    lines = problems[:shown]
    if len(problems) > shown:
        lines.append(f"... and {len(problems) - shown} more")
    return f"{what}: {len(problems)} problems, first: {problems[0]}\n  " + "\n  ".join(lines)
