"""The HTTP layer: routes parse, call one use case and return a wire schema."""
