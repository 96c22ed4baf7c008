"""Runs of the real ServerApp logic against the real ClientApps inside one process, without
Ray or a SuperLink: the grids (one client after another, or trained together per
architecture) and `run_inprocess`, which the experiment runner and the tests use."""
