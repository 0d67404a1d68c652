"""The oldest ONNX opset fdet exports to, in a module of its own: the ``fdet export`` parser
reads it without importing torch."""

MIN_OPSET = 18
"""The oldest ONNX opset fdet exports to (the translations of its operators are written in
opset 18)."""
