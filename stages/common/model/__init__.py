"""The classifier: arch facts without torch, building, checkpoint format, device, ONNX export."""
