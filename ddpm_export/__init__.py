"""Export a DDPM — a ddpm-train checkpoint, a diffusers folder or any PyTorch module — to ONNX / TorchScript / .pt2
with its sampling contract, and verify it against the original."""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "export_module":  # imported on use: it brings torch and onnx
        from ddpm_export.export import export_module

        return export_module
    raise AttributeError(f"module 'ddpm_export' has no attribute {name!r}")
