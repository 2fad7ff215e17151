"""Scheduling and KV cache bookkeeping on the host: the iteration-level scheduler, its waiting-
queue policies and length predictors, paged KV blocks and swap space."""
