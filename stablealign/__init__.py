"""stable-align: Stable Alignment (arXiv 2305.16960) as distributed services.

This package is the shared library of the services: settings, the NATS bus, gRPC bootstrap,
metrics, logging, LLM backends, records and the generated protobuf code (``stablealign.v1``).
"""

__version__ = "0.1.0"
