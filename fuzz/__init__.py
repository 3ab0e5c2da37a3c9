"""Fuzz harnesses for every parser of untrusted bytes; run them with `python -m fuzz`."""
