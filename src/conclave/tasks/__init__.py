"""Bundled tasks: real data sets with their trainer factories and published baselines.

A run spec names a task's factory as ``module:attribute``, for example
``conclave.tasks.heart_disease:make_trainer``.
"""
