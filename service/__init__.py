"""fastadapt's HTTP service: API, use cases, store and the device engine."""
