"""The live dashboard of `trinity serve`: `GET /dashboard`, fed by `GET /dashboard/events` (server-sent events)."""
