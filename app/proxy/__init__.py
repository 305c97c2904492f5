"""The HTTP surface: the only package that knows about Flask's request."""
