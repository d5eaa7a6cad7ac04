"""Every error ddpm-export reports to users; each message is one line."""


class CheckpointError(ValueError):
    """A checkpoint that cannot (or must not) be loaded."""


class SourceError(ValueError):
    """A model folder or module that cannot be exported (what is wrong with it, in one line)."""


class ExportError(RuntimeError):
    """An export that could not be completed or did not verify."""


class OnnxExportError(ExportError):
    """Both ONNX exporters failed, or the result did not pass ``onnx.checker``."""


class TorchScriptExportError(ExportError):
    """Tracing failed or warned (a warning means the trace may not generalise)."""
