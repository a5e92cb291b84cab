"""fastadapt's meta-learning core: pure PyTorch, no server, no database."""
