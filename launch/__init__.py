"""Command line and process launching."""
