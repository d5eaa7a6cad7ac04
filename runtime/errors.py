"""Every error the runtime reports to users; each message is one line and says what to do."""


class ModelError(ValueError):
    """A model file that cannot be used: missing, unreadable, no contract, or its provider failed to start."""


class ContractError(ValueError):
    """A sampling contract that cannot be read; the message names the offending field."""


class GenerationError(RuntimeError):
    """A run that cannot proceed (bad settings or a model that produced NaN/Inf)."""


class SettingsError(GenerationError, ValueError):
    """Run settings (sampler, steps, η, guidance, classes, variance) that the model or the sampler cannot take."""


class ClusterError(GenerationError):
    """A Ray run that cannot start: Ray not installed, the cluster unreachable, or no node that holds one worker."""


class OutputError(RuntimeError):
    """The output folder cannot be used (unwritable, full, or holds a different run)."""


class EvalError(RuntimeError):
    """Images or reference data that cannot be evaluated."""


class IdxError(ValueError):
    """A missing, unreadable or malformed IDX file; the message names it."""


def reason(e: BaseException) -> str:
    """An exception's message as one line for a user: its first non-blank line (some of torch's start with a
    newline), else the exception's type name."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
