"""Sampling on the device: the sampler and the verification of speculative proposals."""
