"""The wire formats: funnel events, training samples, model-version records."""
