"""The built-in trainers (``snap``, ``mbpa``, ``sleep``): plain PyTorch programs written against
the public trainer API, :mod:`hpsweep.trainer`, exactly as a user's own trainer is."""
