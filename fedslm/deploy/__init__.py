"""Deployment tooling for real sites: development certificates (`certs`) and a whole
deployment on 127.0.0.1 for tests and benchmarks (`loopback`)."""
