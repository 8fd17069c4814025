"""The ``vbs`` command line."""
