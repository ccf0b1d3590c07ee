"""The HTTP face of the swarm: an OpenAI-compatible API, a web chat and a swarm monitor (see app.py)."""
