"""The service's logic without HTTP or a queue runner: what the API routes and the RQ
tasks call. Functions take keyword-only arguments and raise `lorafold.errors` types."""
