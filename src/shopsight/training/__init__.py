"""Training: the task table (``tasks``), the task-free runtime, the networks, one package a task."""

__all__: list[str] = []
