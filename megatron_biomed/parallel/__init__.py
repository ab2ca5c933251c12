"""Parallelism applied from outside the model: the device mesh, tensor/sequence-parallel plans,
pipeline stages and schedules, data-parallel wrapping (DDP or FSDP2)."""
