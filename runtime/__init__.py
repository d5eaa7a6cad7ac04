"""The torch-free DDPM runtime: schedule, sampling contract, plan, samplers and batch generation (numpy +
onnxruntime)."""

from runtime.errors import GenerationError, ModelError, SettingsError
from runtime.pipeline import Pipeline, load

Generator = Pipeline  # the name before 0.2; it collided with numpy.random.Generator

__all__ = ["GenerationError", "Generator", "ModelError", "Pipeline", "SettingsError", "load"]
