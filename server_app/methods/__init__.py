"""One module per method's server side, found by its name (common/methods.py declares each
method): mh_pfedhn, mh_pfedhngd (also mh_pfedhngd_no_distill), local, fedavg (also
fedprox, whose difference is on the client), fedavgm, pfedhn."""
