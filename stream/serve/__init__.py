"""Serving: the scoring model, the funnel-order projection, the scorer process and its HTTP API."""
