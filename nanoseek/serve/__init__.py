"""Serving: the OpenAI-compatible HTTP API (`nanoseek serve`) and the terminal chat (`nanoseek chat`)."""
