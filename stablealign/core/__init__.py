"""What every room and process builds on: errors, the settings loader, logs, metrics, redaction, retries,
timing and process set-up. Imports no other room of the library."""
