"""HTTP front end (FastAPI): routes, schemas, auth, errors. Thin: calls lorafold.service."""
