"""Local server processes we start and stop ourselves (Redis, SeaweedFS, API, workers)."""
