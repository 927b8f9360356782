"""Quantization: calibration observers, QDQ insertion, integer folding."""
