"""Experiment sweeps: expand a sweep file into runs, run them, tabulate and plot the results."""
