"""Command-line tools beside the two main commands."""
