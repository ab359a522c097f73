"""The edge: HTTP routes, client authentication and admission, before a session exists."""
