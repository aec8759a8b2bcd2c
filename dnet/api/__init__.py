"""The HTTP API: OpenAI endpoints and cluster management, served by hypercorn."""
