"""Analyses: each takes an :class:`~landscape.objective.Objective` and returns a result object."""
