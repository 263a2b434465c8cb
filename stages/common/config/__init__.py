"""What a run is told: params.yaml's schema and loader, every artifact path of the pipeline."""
