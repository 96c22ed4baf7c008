"""Deployment tooling: the topology shared by docker/compose.yml and the local cluster."""
