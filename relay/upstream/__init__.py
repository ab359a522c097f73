"""The upstream: backend pools, credentials and dialling the service."""
