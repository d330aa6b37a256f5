"""The training library: alignment data, the Stable Alignment loss, training, evaluation, generation.

What `stable-align train|eval|generate` runs in-process and what the trainer service's jobs run
(``python -m stablealign.training.train``, one process or torchrun + FSDP on a GPU pod). It uses
only the shared library (``stablealign``) and the ``ml`` extra (torch, transformers, accelerate).
"""
