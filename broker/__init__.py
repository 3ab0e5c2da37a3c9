"""The privileged broker (arrives with the privilege split)."""
