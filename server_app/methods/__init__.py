"""One module per method, found by its name (common/methods.py declares each of them):
mh_pfedhn, mh_pfedhngd (also mh_pfedhng), local, fedavg, pfedhn."""
