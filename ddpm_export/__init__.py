"""Export a trained DDPM checkpoint to ONNX / TorchScript with its sampling contract, and verify it."""

__version__ = "0.1.0"
