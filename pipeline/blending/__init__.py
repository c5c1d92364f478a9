"""Blending experiments: blend modes, the weight search and nested CV, the members, the
ensemble's choices, and the ensemble and submit stages' work."""
