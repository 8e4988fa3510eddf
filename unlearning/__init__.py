"""Interference-aware multi-task unlearning: a plain-PyTorch library.

No HTTP, SQL or Celery here. The service (``worker``, ``app``) calls
:func:`unlearning.job.run_unlearning_job`; a researcher can use the pieces
alone: tasks, datasets, the model, training, unlearning methods, evaluation
and the benchmark.
"""
__version__ = "0.1.0"
