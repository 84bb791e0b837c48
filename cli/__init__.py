"""The ``landscape`` command line, installed as ``landscape.cli``."""
