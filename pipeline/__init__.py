"""Reproduce the 1-unit softmax collapse and the sigmoid/softmax parity on your own data.

Stages (one module each, each a function under a thin CLI in :mod:`pipeline.cli`):
``extract`` (images -> Xception features in HDF5), ``sweep`` (Optuna over classifier heads,
every trial an MLflow run), ``export`` (tables and figures from the MLflow runs) and ``main``
(the three in a row under one parent run).
"""

__version__ = "0.2.0"
