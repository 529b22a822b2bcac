"""Streaming side of aitm-stream: broker, event contract, joiner, trainer, scorer."""
