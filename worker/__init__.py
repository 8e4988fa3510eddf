"""The job side of the service: the compliance record's schema, the outbox relay,
the Celery app and the unlearning jobs. Depends on ``model_store`` and ``unlearning``;
never on ``app``."""
