"""Serving an artifact over HTTP: OpenAI's images API in one process (``diffbake serve``) or as replicas on Ray
Serve. Serving side only: it loads artifacts and imports nothing that compiles."""
