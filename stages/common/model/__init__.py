"""The classifier: built from config's arch families, checkpoint format, device, ONNX export."""
