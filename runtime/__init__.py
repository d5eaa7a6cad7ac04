"""The torch-free DDPM runtime: schedule, sampling contract, samplers and batch generation (numpy + onnxruntime)."""

from runtime.generator import Generator, GenerationError, load
from runtime.errors import ModelError

__all__ = ["Generator", "GenerationError", "ModelError", "load"]
