"""Helpers of ``scripts/bench`` (see its docstring): drivers, child roles, report."""
