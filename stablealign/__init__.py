"""stable-align: Stable Alignment (arXiv 2305.16960) as distributed services.

This package is the shared library of the services, in rooms that name their job; each room imports
only the rooms below it (import-linter contracts in pyproject.toml):

- ``training``  the Stable Alignment trainer, data, evaluation (no NATS, no service framework);
- ``serving``   the service framework: start, drain, gRPC, its TLS and authorization, ``ServiceSettings``;
- ``llm``       LLM access: backends, endpoints, calls, prompts, judges, model paths;
- ``sandbox``   SANDBOX data: records, record reader, worlds' ids and states, agent memory, ratings;
- ``nats``      NATS: the client, the request server, the subject catalogue, stream limits, users;
- ``core``      errors, settings loader, logs, metrics, retries, process set-up;

and the generated protobuf code (``stablealign.v1``).
"""

__version__ = "0.1.0"
