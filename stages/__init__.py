"""The pipeline's stages, one module per DVC stage (``python -m stages.<name>``)."""
