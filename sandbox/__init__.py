"""Confinement primitives (arrive with the privilege split)."""
