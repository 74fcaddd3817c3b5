"""The `serve` command: an image generation service (OpenAI images API) on the engine."""
