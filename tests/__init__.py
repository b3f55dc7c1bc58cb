"""The test suite: a regular package, so that `tests.*` imports find it before any installed package
named `tests`."""
