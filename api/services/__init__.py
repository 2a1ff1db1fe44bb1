"""Domain services: the logic behind the routes, keyword-only with the session first."""
