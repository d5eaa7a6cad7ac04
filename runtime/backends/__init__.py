"""Running an exported model: the backend table and loading, onnxruntime with its fused step graph, TorchScript, .pt2
and the torch loop."""
