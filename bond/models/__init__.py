"""Gemma models, presets and checkpoint converters."""
