"""The classifier: built from config's arch families, checkpoint, device, ONNX and other formats."""
