"""The way in: the sweep file, typed and strict, and the cells it plans."""
