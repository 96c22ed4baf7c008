"""One module per method's server side, named as the method (common/methods.py declares each
and says which module serves it: fedprox and fedakt use fedavg's, mh_pfedhngd_no_distill
mh_pfedhngd's)."""
