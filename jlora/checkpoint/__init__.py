"""Checkpoints and adapters on disk (orbax), base fingerprints, atomic directories and run directories.

What a run saves and how it is found again: only the trainable tree and its metadata.
"""
