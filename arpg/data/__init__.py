"""Prepared dataset arrays: decoding sources and loading the artifacts."""
