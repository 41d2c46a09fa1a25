"""Artifacts on the Hugging Face Hub: fetching a pinned build that fits this host (runtime side), and pushing
one (publishing side). Reads and writes the artifact format; runs no compiled code."""
