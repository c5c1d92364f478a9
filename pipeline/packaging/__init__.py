"""Inference packages for code competitions: manifest, building, and the offline reader."""
