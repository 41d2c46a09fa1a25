"""``diffbake bench``: the artifact against eager diffusers and torch.compile, each measured in a fresh process."""
