"""Every error ddpm-train reports to users; each message is one line."""


class DatasetError(ValueError):
    """Training data that is missing, unreadable or not what was asked for."""


class TrainError(ValueError):
    """A training request that cannot run."""
