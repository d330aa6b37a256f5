"""LLM access: the chat and embedding backends, endpoints, one checked call (``calls``), prompt formats,
rating prompts, judges and model paths."""
