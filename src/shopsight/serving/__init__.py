"""Request/response schemas, the framework-free predictor core, the Ray Serve app (routes from the task
table)."""

__all__: list[str] = []
