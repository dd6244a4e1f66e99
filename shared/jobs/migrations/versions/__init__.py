"""Revisions of the jobs schema, oldest first: NNNN_what.py, each naming its predecessor."""
