"""Shared: runs read back and shown. A run's report.html, `fedslm compare` over runs and
sweeps (table, frontier, the sweep's privacy per site), and the experiment tracker."""
