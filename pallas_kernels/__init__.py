"""Attention kernels in Pallas, each beside a pure-JAX reference with the same signature.

This package never imports `jaxserve` or `server`.
"""
