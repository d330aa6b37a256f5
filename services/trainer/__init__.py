"""The trainer service: a NATS/gRPC job API, a durable job queue and the runners that start training jobs.

A job runs the training library (``stablealign/training``) in its own process — locally or as a
Kubernetes job with torchrun + FSDP — so this service never imports torch. ``loss.py`` here only
re-exports the loss at the import path the design promises.
"""
