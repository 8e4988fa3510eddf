"""The HTTP side of the service: thin FastAPI routes over the rules in ``worker``."""
