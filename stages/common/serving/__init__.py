"""Answering for picture files: PyTorch and ONNX Runtime classifiers, folder walks, batches."""
