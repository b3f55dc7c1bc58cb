"""Request/response schemas, the framework-free predictor, the Ray Serve app (filled by the serving issue)."""

__all__: list[str] = []
