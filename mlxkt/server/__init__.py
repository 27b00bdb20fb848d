"""`mlxkt serve`: OpenAI- and Ollama-compatible HTTP server with a chat page.

Layout: cli.py (command), app.py (ASGI app + model loading), engine.py (one worker thread,
bounded queue, cancellation), prefix_cache.py, prompt.py (chat templates), textstream.py
(stop strings, <think> split), protocol.py (request schemas), openai_routes.py,
ollama_routes.py, security.py (Host/Origin/API key/body size), static/ (chat page).
Nothing heavy is imported here.
"""
