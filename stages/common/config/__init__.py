"""What a run is told: params.yaml's schema and loader, arch families, formats, alarm label."""
