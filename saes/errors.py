"""Error types of the `saes` package: every bad input raises a ValueError subclass with a one-line message."""


class SAEError(ValueError):
    """Base class: a one-line, user-facing error about an SAE config, file or input."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # force one line


class SAEConfigError(SAEError):
    """An invalid SAEConfig / TrainConfig field (width <= 0, k >= width, ...)."""


class UnknownArchitectureError(SAEError):
    """An architecture name that is not in `saes.registry` (the message lists the registry's names)."""


class SAELoadError(SAEError):
    """A saved SAE that cannot be loaded: missing/corrupted/truncated files, wrong d_in, bad layout."""


class CheckpointError(SAEError):
    """A training checkpoint that does not match the run it is resumed into."""


class DeviceError(SAEError):
    """A device that is malformed (not auto, cpu, cuda or cuda:N) or not present on this machine."""
