"""Speculative decoding's proposers: n-gram prompt lookup and a draft model."""
