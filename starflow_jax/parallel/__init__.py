"""Parallelism: the device mesh and the sharding rules."""
