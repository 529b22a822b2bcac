"""Kafka plumbing: the embedded broker, faust's bulk handler, the batch sender, offsets."""
