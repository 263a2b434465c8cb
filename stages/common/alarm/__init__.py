"""The person alarm: temperature, threshold, sealed operating point, what the threshold promises."""
