"""Models, the plain PyTorch loop, Ray Train and Tune wrappers, evaluation (filled by the training issue)."""

__all__: list[str] = []
