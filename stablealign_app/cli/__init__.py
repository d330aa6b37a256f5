"""The `stable-align` command line."""
