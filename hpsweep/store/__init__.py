"""The way back: the MLflow layout and writes, bulk reads, storage and leases."""
