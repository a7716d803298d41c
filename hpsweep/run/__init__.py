"""The way out: the driver (Ray Tune), the trials on the workers, Ray's start and end."""
