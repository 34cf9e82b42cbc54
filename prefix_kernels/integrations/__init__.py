"""Integrations with other libraries: transformers' attention interface."""
