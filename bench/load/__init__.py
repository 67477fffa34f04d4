"""``bench load``: locust as the load engine."""
