"""Every error ddpm-train reports to users; each message is one line."""


class DatasetError(ValueError):
    """Training data that is missing, unreadable or not what was asked for."""


class TrainError(ValueError):
    """A training request that cannot run."""


class TrainInterrupted(RuntimeError):
    """SIGTERM or Ctrl-C stopped the run; a resumable checkpoint was written (the message says where)."""


class RankLost(RuntimeError):
    """Under DDP, another rank ended at once (a second signal, or a crash) while this one was in a collective."""
