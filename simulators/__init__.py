"""Seeded funnel simulator with ground truth, fault injection, sinks and Ali-CCP replay."""
