"""Deployment tooling for real sites: development certificates and keys (`certs`), signed
apps (`signing`), the coordinator's Fleet-only public port (`fleet_proxy`), and a whole
deployment on 127.0.0.1 for tests and benchmarks (`loopback`)."""
