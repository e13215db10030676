"""User-facing errors. The CLI prints `error: <message>` for these and exits non-zero; anything else is a bug."""


class JaxloraError(Exception):
    """Base class: the message is written for the user, on one line."""


class ConfigError(JaxloraError):
    """A model configuration jaxlora cannot (or will not silently) implement."""


class ConversionError(JaxloraError):
    """A source checkpoint that is missing, malformed, or does not match its config."""


class CheckpointError(JaxloraError):
    """A converted jaxlora checkpoint that is missing or unreadable."""


class UsageError(JaxloraError):
    """Impossible arguments to a public function or CLI command."""


class ExportError(JaxloraError):
    """The model cannot be written in the requested format."""


def one_line(error: Exception) -> str:
    """An exception's message on one line: its first line, at most 300 characters."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."
